/** RFC 1123 host label: letters, digits and inner hyphens, at most 63. */
const labelPattern = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

export type LabelResult = { ok: true; label: string } | { ok: false; reason: string };

/**
 * A Consul service name -> the DNS label it is published under. Lower case, and "_" (allowed by
 * Consul, not by DNS hosts) becomes "-". Anything else that is not a valid label is refused, not
 * mangled, so two services can never be silently merged.
 */
export function dnsLabel(service: string): LabelResult {
  const label = service.toLowerCase().replace(/_/g, '-');
  if (labelPattern.test(label)) return { ok: true, label };
  if (label.length > 63) return { ok: false, reason: `is ${label.length} characters long; a DNS label holds at most 63` };
  return { ok: false, reason: 'expected letters, digits, "-" or "_", not starting or ending with "-"' };
}

/** A DNS suffix such as "local" or "mesh.internal": one or more labels. */
export function isValidSuffix(suffix: string): boolean {
  return suffix.length <= 200 && suffix.split('.').every((l) => labelPattern.test(l));
}
