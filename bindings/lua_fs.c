/* segue.fs: the few synchronous file-system questions the config loader and
 * the host ask (start-up only, never on the hot path). */
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <stdio.h>
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

/* chmod(path, mode) -> true | nil, err */
static int l_chmod(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_Integer mode = luaL_checkinteger(L, 2);
  if (chmod(path, (mode_t)mode) != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot chmod %s: %s", path, strerror(errno));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* umask(mode) -> the previous mask */
static int l_umask(lua_State *L) {
  lua_pushinteger(L, umask((mode_t)luaL_checkinteger(L, 1)));
  return 1;
}

/* ---- the pid file: a write lock held while segue runs --------------------
 * `segue reload` signals only the process holding the lock (fcntl tells its
 * pid), never whatever number a stale file holds. fcntl locks go with the
 * process: a kill -9 releases them, children do not inherit them, and the
 * descriptor is close-on-exec. Nothing else in the process may open and
 * close the pid file (closing any descriptor of it drops the lock). */

#define PIDFILE_MT "segue.fs.pidfile"

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static int pidfile_gc(lua_State *L) {
  close_fd(luaL_checkudata(L, 1, PIDFILE_MT));
  return 0;
}

static struct flock whole_file(short type) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  return fl;
}

/* lock_pidfile(path) -> handle | nil, err, holder_pid: creates path (0600),
 * write-locks it and writes our pid; the lock lasts while the handle lives
 * (and the process). Fails naming the holder when another process has it. */
static int l_lock_pidfile(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int *fd = lua_newuserdatauv(L, sizeof *fd, 0);
  *fd = -1;
  luaL_setmetatable(L, PIDFILE_MT);
  *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (*fd < 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot open %s: %s", path, strerror(errno));
    return 2;
  }
  struct flock fl = whole_file(F_WRLCK);
  if (fcntl(*fd, F_SETLK, &fl) != 0) {
    int err = errno;
    struct flock q = whole_file(F_WRLCK);
    int holder = fcntl(*fd, F_GETLK, &q) == 0 && q.l_type != F_UNLCK ? (int)q.l_pid : 0;
    close_fd(fd);
    luaL_pushfail(L);
    if (holder)
      lua_pushfstring(L, "%s is locked by process %d: another segue runs with this data directory",
                      path, holder);
    else
      lua_pushfstring(L, "cannot lock %s: %s", path, strerror(err));
    lua_pushinteger(L, holder);
    return 3;
  }
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
  if (fchmod(*fd, 0600) != 0 || ftruncate(*fd, 0) != 0 || pwrite(*fd, buf, (size_t)n, 0) != n) {
    int err = errno;
    close_fd(fd);
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot write %s: %s", path, strerror(err));
    return 2;
  }
  return 1;
}

/* pidfile_holder(path) -> pid | nil, err: the process holding the lock of a
 * pid file, asked of the kernel (the file's content may be stale). */
static int l_pidfile_holder(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "no running segue found (%s: %s)", path, strerror(errno));
    return 2;
  }
  struct flock q = whole_file(F_WRLCK);
  int rc = fcntl(fd, F_GETLK, &q);
  int err = errno;
  close(fd);
  if (rc != 0) {
    luaL_pushfail(L);
    lua_pushfstring(L, "cannot query the lock of %s: %s", path, strerror(err));
    return 2;
  }
  if (q.l_type == F_UNLCK) {
    luaL_pushfail(L);
    lua_pushfstring(L, "no running segue found (%s is stale: no process holds its lock)", path);
    return 2;
  }
  lua_pushinteger(L, q.l_pid);
  return 1;
}

int luaopen_segue_fs(lua_State *L) {
  static const luaL_Reg fns[] = {{"stat", l_stat}, {"executable", l_executable},
                                 {"mkdir_p", l_mkdir_p}, {"realpath", l_realpath},
                                 {"cwd", l_cwd}, {"kill", l_kill}, {"getpid", l_getpid},
                                 {"chmod", l_chmod}, {"umask", l_umask},
                                 {"lock_pidfile", l_lock_pidfile},
                                 {"pidfile_holder", l_pidfile_holder}, {NULL, NULL}};
  sg__lua_class(L, PIDFILE_MT, NULL, (const luaL_Reg[]){{"__gc", pidfile_gc}, {NULL, NULL}});
  luaL_newlib(L, fns);
  return 1;
}
