#include "address.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

int sg__address_parse(const char *address, struct sockaddr_storage *ss) {
  char host[INET6_ADDRSTRLEN + 16];
  const char *hs = address, *he, *port;
  if (!address) return SG_EINVAL;
  if (*address == '[') {
    hs = address + 1;
    he = strchr(hs, ']');
    if (!he || he[1] != ':') return SG_EINVAL;
    port = he + 2;
  } else {
    he = strrchr(address, ':');
    if (!he) return SG_EINVAL;
    port = he + 1;
  }
  size_t hl = (size_t)(he - hs);
  if (hl == 0 || hl >= sizeof host || *port == '\0' || strlen(port) > 5) return SG_EINVAL;
  for (const char *d = port; *d; d++)
    if (*d < '0' || *d > '9') return SG_EINVAL;
  int pn = atoi(port);
  if (pn > 65535) return SG_EINVAL;
  memcpy(host, hs, hl);
  host[hl] = '\0';
  if (uv_ip4_addr(host, pn, (struct sockaddr_in *)ss) == 0) return 0;
  if (uv_ip6_addr(host, pn, (struct sockaddr_in6 *)ss) == 0) return 0;
  return SG_EINVAL;
}

int sg__address_port(const uv_tcp_t *tcp) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  int rc = uv_tcp_getsockname(tcp, (struct sockaddr *)&ss, &len);
  if (rc) return rc;
  return ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                  : ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

void sg__address_peer(const uv_tcp_t *tcp, char *out, size_t cap) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  char ip[INET6_ADDRSTRLEN] = "?";
  snprintf(out, cap, "?");
  if (uv_tcp_getpeername(tcp, (struct sockaddr *)&ss, &len) != 0) return;
  if (ss.ss_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
    uv_ip6_name(a, ip, sizeof ip);
    snprintf(out, cap, "[%s]:%d", ip, ntohs(a->sin6_port));
  } else {
    const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
    uv_ip4_name(a, ip, sizeof ip);
    snprintf(out, cap, "%s:%d", ip, ntohs(a->sin_port));
  }
}
