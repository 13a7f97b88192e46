/* segue.fs: the few synchronous file-system questions the config loader and
 * the host ask (start-up only, never on the hot path). */
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bindings.h"

/* stat(path) -> "file" | "directory" | "other", mode | nil, err */
static int l_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct stat st;
  if (stat(path, &st) != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "directory" : "other");
  lua_pushinteger(L, st.st_mode & 07777);
  return 2;
}

/* executable(path) -> boolean */
static int l_executable(lua_State *L) {
  struct stat st;
  const char *path = luaL_checkstring(L, 1);
  lua_pushboolean(L, stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0);
  return 1;
}

/* mkdir_p(path [, mode]) -> true | nil, err */
static int l_mkdir_p(lua_State *L) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  lua_Integer mode = luaL_optinteger(L, 2, 0755);
  char buf[PATH_MAX];
  if (len == 0 || len >= sizeof buf) return luaL_argerror(L, 1, "bad path length");
  memcpy(buf, path, len + 1);
  for (char *p = buf + 1; ; p++) {
    if (*p == '/' || *p == '\0') {
      char c = *p;
      *p = '\0';
      if (mkdir(buf, (mode_t)mode) != 0 && errno != EEXIST) {
        luaL_pushfail(L);
        lua_pushfstring(L, "cannot create %s: %s", buf, strerror(errno));
        return 2;
      }
      *p = c;
      if (c == '\0') break;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* realpath(path) -> absolute path | nil, err */
static int l_realpath(lua_State *L) {
  char buf[PATH_MAX];
  const char *path = luaL_checkstring(L, 1);
  if (!realpath(path, buf)) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  lua_pushstring(L, buf);
  return 1;
}

static int l_cwd(lua_State *L) {
  char buf[PATH_MAX];
  if (!getcwd(buf, sizeof buf)) return luaL_error(L, "getcwd: %s", strerror(errno));
  lua_pushstring(L, buf);
  return 1;
}

/* kill(pid, signum) -> true | nil, err: for `segue reload` */
static int l_kill(lua_State *L) {
  lua_Integer pid = luaL_checkinteger(L, 1);
  lua_Integer sig = luaL_checkinteger(L, 2);
  luaL_argcheck(L, pid > 0, 1, "must be a process id");
  if (kill((pid_t)pid, (int)sig) != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "process %d: %s", (int)pid, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, getpid());
  return 1;
}

int luaopen_segue_fs(lua_State *L) {
  static const luaL_Reg fns[] = {{"stat", l_stat}, {"executable", l_executable},
                                 {"mkdir_p", l_mkdir_p}, {"realpath", l_realpath},
                                 {"cwd", l_cwd}, {"kill", l_kill}, {"getpid", l_getpid},
                                 {NULL, NULL}};
  luaL_newlib(L, fns);
  return 1;
}
