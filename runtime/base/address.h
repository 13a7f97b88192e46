/* Listen addresses as the config writes them, shared by the servers (hRPC,
 * the client API). */
#ifndef SEGUE_ADDRESS_H
#define SEGUE_ADDRESS_H
#include <uv.h>

/* Parses "host:port": an IPv4 literal ("127.0.0.1:2289") or an IPv6 literal
 * with or without brackets ("[::1]:2289", "::1:2289": the last ':' separates
 * the port) into `ss`. 0, or SG_EINVAL for anything else. */
int sg__address_parse(const char *address, struct sockaddr_storage *ss);

/* The port a bound TCP handle listens on, or a negative libuv error. */
int sg__address_port(const uv_tcp_t *tcp);

/* "127.0.0.1:40112" or "[::1]:40112" for the peer of `tcp` ("?" if unknown). */
void sg__address_peer(const uv_tcp_t *tcp, char *out, size_t cap);

#endif
