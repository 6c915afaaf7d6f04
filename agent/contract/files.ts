/** Names of the rendered files in the run dir that the data plane reads: part of the balancer.json contract. */
export const balancerFile = 'balancer.json';
export const hostsFile = 'hosts';
