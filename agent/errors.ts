/** One error hierarchy: a stable `code` that logs, metrics and callers can match on. */
export class LoopmeshError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

export class ConfigError extends LoopmeshError {}
export class ConsulError extends LoopmeshError {}
export class PlanError extends LoopmeshError {}
export class RenderError extends LoopmeshError {}
export class BalancerError extends LoopmeshError {}
export class DnsError extends LoopmeshError {}
export class AdminError extends LoopmeshError {}
export class DataPlaneError extends LoopmeshError {}

export const codes = {
  configInvalid: 'LM_ERR_CONFIG_INVALID',
  configFile: 'LM_ERR_CONFIG_FILE',
  consulUnreachable: 'LM_ERR_CONSUL_UNREACHABLE',
  consulStatus: 'LM_ERR_CONSUL_STATUS',
  consulInvalidData: 'LM_ERR_CONSUL_INVALID_DATA',
  consulCasConflict: 'LM_ERR_CONSUL_CAS_CONFLICT',
  planInvalidName: 'LM_ERR_PLAN_INVALID_NAME',
  planNameCollision: 'LM_ERR_PLAN_NAME_COLLISION',
  planNoPort: 'LM_ERR_PLAN_NO_PORT',
  planAddressesExhausted: 'LM_ERR_PLAN_ADDRESSES_EXHAUSTED',
  planNoAddress: 'LM_ERR_PLAN_NO_ADDRESS',
  /** The address table could not be read or written in Consul KV: new services wait for an address. */
  addressTableWrite: 'LM_ERR_ADDRESS_TABLE_WRITE',
  renderTemplate: 'LM_ERR_RENDER_TEMPLATE',
  renderWrite: 'LM_ERR_RENDER_WRITE',
  balancerConfig: 'LM_ERR_BALANCER_CONFIG',
  balancerListen: 'LM_ERR_BALANCER_LISTEN',
  balancerNoBackend: 'LM_ERR_BALANCER_NO_BACKEND',
  dnsMalformed: 'LM_ERR_DNS_MALFORMED',
  dnsListen: 'LM_ERR_DNS_LISTEN',
  hostsWrite: 'LM_ERR_HOSTS_WRITE',
  adminListen: 'LM_ERR_ADMIN_LISTEN',
  handover: 'LM_ERR_HANDOVER',
  consulStale: 'LM_ERR_CONSUL_STALE',
  servicesKvMissing: 'LM_ERR_SERVICES_KV_MISSING',
  consulInvalidInstance: 'LM_ERR_CONSUL_INVALID_INSTANCE',
  consulTls: 'LM_ERR_CONSUL_TLS',
  tokenFile: 'LM_ERR_TOKEN_FILE',
  tokenInArgv: 'LM_ERR_TOKEN_IN_ARGV',
  planAddressInvalid: 'LM_ERR_PLAN_ADDRESS_INVALID',
  planAddressConflict: 'LM_ERR_PLAN_ADDRESS_CONFLICT',
  planSelfBackend: 'LM_ERR_PLAN_SELF_BACKEND',
  planInvalidPolicy: 'LM_ERR_PLAN_INVALID_POLICY',
  trafficInvalid: 'LM_ERR_TRAFFIC_INVALID',
  balancerSelfBackend: 'LM_ERR_BALANCER_SELF_BACKEND',
  hostsOwned: 'LM_ERR_HOSTS_OWNED',
  hostsConcurrent: 'LM_ERR_HOSTS_CONCURRENT',
  hostsInvalidLine: 'LM_ERR_HOSTS_INVALID_LINE',
  runDirUnsafe: 'LM_ERR_RUN_DIR_UNSAFE',
  runDirFile: 'LM_ERR_RUN_DIR_FILE',
  adminHost: 'LM_ERR_ADMIN_HOST',
  adminPublic: 'LM_ERR_ADMIN_PUBLIC',
  dnsTcpDeadline: 'LM_ERR_DNS_TCP_DEADLINE',
  dnsTcpLimit: 'LM_ERR_DNS_TCP_LIMIT',
  workerDown: 'LM_ERR_WORKER_DOWN',
  workerRestart: 'LM_ERR_WORKER_RESTART',
  gatewayInvalid: 'LM_ERR_GATEWAY_INVALID',
  gatewayNoAddress: 'LM_ERR_GATEWAY_NO_ADDRESS',
  gatewayRegister: 'LM_ERR_GATEWAY_REGISTER',
} as const;

/** The one shape of a problem: what is wrong, with which service (when one), under a stable code. */
export interface Problem {
  service?: string;
  code: string;
  message: string;
}

export type ErrorCode = (typeof codes)[keyof typeof codes];

export function errorCode(err: unknown): string {
  if (err instanceof LoopmeshError) return err.code;
  if (err && typeof err === 'object' && 'code' in err && typeof err.code === 'string') return err.code;
  return 'LM_ERR_UNKNOWN';
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
