/* libpq, loaded when a store on PostgreSQL is first opened (dlopen), not
 * when segue starts: libpq pulls in GnuTLS, p11-kit, Kerberos and LDAP,
 * whose relocated data is about 400 KB of private memory in every process
 * that loads them, and a segue on SQLite never needs them. Include after
 * <libpq-fe.h>: the PQ* functions the store calls become calls through
 * sg__pq. */
#ifndef SG_PQ_LAZY_H
#define SG_PQ_LAZY_H

#include <libpq-fe.h>
#include <stddef.h>

typedef struct {
  int (*ntuples)(const PGresult *res);
  char *(*errorMessage)(const PGconn *conn);
  void (*clear)(PGresult *res);
  char *(*getvalue)(const PGresult *res, int tup_num, int field_num);
  int (*getisnull)(const PGresult *res, int tup_num, int field_num);
  ConnStatusType (*status)(const PGconn *conn);
  ExecStatusType (*resultStatus)(const PGresult *res);
  int (*nfields)(const PGresult *res);
  int (*getlength)(const PGresult *res, int tup_num, int field_num);
  char *(*resultErrorMessage)(const PGresult *res);
  int (*flush)(PGconn *conn);
  void (*finish)(PGconn *conn);
  int (*socket)(const PGconn *conn);
  int (*setnonblocking)(PGconn *conn, int arg);
  int (*sendQueryParams)(PGconn *conn, const char *command, int nParams, const Oid *paramTypes, const char *const *paramValues, const int *paramLengths, const int *paramFormats, int resultFormat);
  int (*sendQuery)(PGconn *conn, const char *query);
  char *(*resultErrorField)(const PGresult *res, int fieldcode);
  int (*isBusy)(PGconn *conn);
  PGresult *(*getResult)(PGconn *conn);
  void (*freemem)(void *ptr);
  int (*consumeInput)(PGconn *conn);
  PQconninfoOption *(*conninfoParse)(const char *conninfo, char **errmsg);
  void (*conninfoFree)(PQconninfoOption *connOptions);
  PGconn *(*connectStart)(const char *conninfo);
  PostgresPollingStatusType (*connectPoll)(PGconn *conn);
  char *(*cmdTuples)(PGresult *res);
} sg__pq_api;

extern sg__pq_api sg__pq;

/* Loads libpq and fills sg__pq: 0, or -1 with the reason in err. Call it
 * from the loop thread (the store opens there). */
int sg__pq_load(char *err, size_t errlen);

#define PQntuples sg__pq.ntuples
#define PQerrorMessage sg__pq.errorMessage
#define PQclear sg__pq.clear
#define PQgetvalue sg__pq.getvalue
#define PQgetisnull sg__pq.getisnull
#define PQstatus sg__pq.status
#define PQresultStatus sg__pq.resultStatus
#define PQnfields sg__pq.nfields
#define PQgetlength sg__pq.getlength
#define PQresultErrorMessage sg__pq.resultErrorMessage
#define PQflush sg__pq.flush
#define PQfinish sg__pq.finish
#define PQsocket sg__pq.socket
#define PQsetnonblocking sg__pq.setnonblocking
#define PQsendQueryParams sg__pq.sendQueryParams
#define PQsendQuery sg__pq.sendQuery
#define PQresultErrorField sg__pq.resultErrorField
#define PQisBusy sg__pq.isBusy
#define PQgetResult sg__pq.getResult
#define PQfreemem sg__pq.freemem
#define PQconsumeInput sg__pq.consumeInput
#define PQconninfoParse sg__pq.conninfoParse
#define PQconninfoFree sg__pq.conninfoFree
#define PQconnectStart sg__pq.connectStart
#define PQconnectPoll sg__pq.connectPoll
#define PQcmdTuples sg__pq.cmdTuples

#endif
