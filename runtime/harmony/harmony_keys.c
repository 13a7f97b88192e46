/* The server's Ed25519 key pair: load, create once, sign. */
#include "harmony_keys.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "segue.h"

#define errf sg__harmony_errf  /* shared with harmony_token.c */

struct sg__keypair {
  unsigned char *sk;                       /* sodium_malloc'd, read-only */
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
};

int sg__harmony_errf(char *err, size_t errlen, int code, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

static int sodium_ready(char *err, size_t errlen) {
  if (sodium_init() < 0)
    return errf(err, errlen, SG_EKEY, "libsodium failed to initialise");
  return 0;
}

/* Derives the whole key pair from a seed into guarded memory. */
static int keypair_from_seed(const unsigned char *seed, sg__keypair **out) {
  sg__keypair *kp = calloc(1, sizeof *kp);
  if (!kp) return SG_ENOMEM;
  kp->sk = sodium_malloc(SG_KEYS_SECRET_BYTES);
  if (!kp->sk) {
    free(kp);
    return SG_ENOMEM;
  }
  crypto_sign_seed_keypair(kp->pk, kp->sk, seed);
  sodium_mprotect_readonly(kp->sk);
  *out = kp;
  return 0;
}

/* 64 bytes of key material are only usable when the stored public half is
 * the one the seed yields; a mismatch means a damaged or spliced file, and
 * signing with it would produce tokens no peer can verify. */
static int keypair_from_material(const unsigned char *secret, size_t len,
                                 sg__keypair **out) {
  if (len != SG_KEYS_SEED_BYTES && len != SG_KEYS_SECRET_BYTES) return SG_EINVAL;
  sg__keypair *kp;
  int rc = keypair_from_seed(secret, &kp);
  if (rc) return rc;
  if (len == SG_KEYS_SECRET_BYTES &&
      sodium_memcmp(kp->pk, secret + SG_KEYS_SEED_BYTES, SG_KEYS_PUBLIC_BYTES)) {
    sg__keys_free(kp);
    return SG_EKEY;
  }
  *out = kp;
  return 0;
}

int sg__keys_from_secret(const unsigned char *secret, size_t len,
                        sg__keypair **out, char *err, size_t errlen) {
  if (!secret || !out)
    return errf(err, errlen, SG_EINVAL, "no key material given");
  int rc = sodium_ready(err, errlen);
  if (rc) return rc;
  rc = keypair_from_material(secret, len, out);
  if (rc == SG_EINVAL)
    return errf(err, errlen, rc, "secret key is %zu bytes, expected 32 (seed) "
                "or 64 (seed and public key)", len);
  if (rc == SG_EKEY)
    return errf(err, errlen, rc, "secret key: public half does not match the seed");
  return rc ? errf(err, errlen, rc, "%s", sg_strerror(rc)) : 0;
}

int sg__keys_generate(sg__keypair **out) {
  unsigned char seed[SG_KEYS_SEED_BYTES];
  if (!out) return SG_EINVAL;
  int rc = sodium_ready(NULL, 0);
  if (rc) return rc;
  randombytes_buf(seed, sizeof seed);
  rc = keypair_from_seed(seed, out);
  sodium_memzero(seed, sizeof seed);
  return rc;
}

void sg__keys_free(sg__keypair *kp) {
  if (!kp) return;
  sodium_free(kp->sk);  /* wipes before unmapping */
  free(kp);
}

const unsigned char *sg__keys_public(const sg__keypair *kp) { return kp->pk; }

void sg__keys_export_secret(const sg__keypair *kp,
                           unsigned char out[SG_KEYS_SECRET_BYTES]) {
  memcpy(out, kp->sk, SG_KEYS_SECRET_BYTES);
}

int sg__keys_sign(const sg__keypair *kp, const unsigned char *msg, size_t len,
                 unsigned char sig[SG_KEYS_SIG_BYTES]) {
  if (!kp || !sig || (!msg && len)) return SG_EINVAL;
  crypto_sign_detached(sig, NULL, msg ? msg : (const unsigned char *)"", len, kp->sk);
  return 0;
}

int sg__keys_public_b64(const sg__keypair *kp, char *out, size_t outlen) {
  if (!kp || !out || outlen < SG_KEYS_PUBLIC_B64_SIZE) return SG_EINVAL;
  sodium_bin2base64(out, outlen, kp->pk, SG_KEYS_PUBLIC_BYTES,
                    sodium_base64_VARIANT_ORIGINAL);
  return 0;
}

/* ---- the key file ------------------------------------------------------- */

static int io_full(int fd, unsigned char *buf, size_t len, int writing) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = writing ? write(fd, buf + done, len - done)
                        : read(fd, buf + done, len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) return SG_EKEY;  /* the file shrank under us */
    done += (size_t)n;
  }
  return 0;
}

static int ensure_dir(const char *dir, char *err, size_t errlen) {
  struct stat st;
  if (mkdir(dir, 0700) == 0) return 0;
  if (errno != EEXIST)
    return errf(err, errlen, -errno, "cannot create data directory %s: %s",
                dir, strerror(errno));
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
    return errf(err, errlen, -ENOTDIR, "data directory %s is not a directory", dir);
  return 0;
}

/* Checks what can be judged without reading the secret. */
static int check_file_stat(const char *path, const struct stat *st, char *err,
                           size_t errlen) {
  if (!S_ISREG(st->st_mode))
    return errf(err, errlen, SG_EKEY, "%s: not a regular file", path);
  if (st->st_mode & 077)
    return errf(err, errlen, SG_EKEY, "%s: mode %04o lets group or others use "
                "the secret key; run chmod 600 on it", path,
                (unsigned)(st->st_mode & 07777));
  if (st->st_size != SG_KEYS_SECRET_BYTES)
    return errf(err, errlen, SG_EKEY, "%s: %lld bytes, expected %d (32-byte "
                "seed, then 32-byte public key)", path, (long long)st->st_size,
                SG_KEYS_SECRET_BYTES);
  return 0;
}

static int read_key_fd(int fd, const char *path, unsigned char *buf, char *err,
                       size_t errlen) {
  struct stat st;
  if (fstat(fd, &st) != 0)
    return errf(err, errlen, -errno, "cannot stat %s: %s", path, strerror(errno));
  int rc = check_file_stat(path, &st, err, errlen);
  if (rc) return rc;
  rc = io_full(fd, buf, SG_KEYS_SECRET_BYTES, 0);
  if (rc == SG_EKEY)
    return errf(err, errlen, rc, "%s: shrank while being read", path);
  if (rc) return errf(err, errlen, rc, "cannot read %s: %s", path, sg_strerror(rc));
  return 0;
}

/* Returns -ENOENT, silently, when there is no file yet. */
static int load_file(const char *path, sg__keypair **out, char *err, size_t errlen) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) return -ENOENT;
  if (fd < 0)
    return errf(err, errlen, -errno, "cannot open %s: %s", path, strerror(errno));
  unsigned char *buf = sodium_malloc(SG_KEYS_SECRET_BYTES);
  int rc = buf ? read_key_fd(fd, path, buf, err, errlen)
               : errf(err, errlen, SG_ENOMEM, "out of memory reading %s", path);
  close(fd);
  if (rc) {
    sodium_free(buf);
    return rc;  /* read_key_fd said what is wrong */
  }
  rc = keypair_from_material(buf, SG_KEYS_SECRET_BYTES, out);
  sodium_free(buf);
  if (rc == SG_EKEY)
    return errf(err, errlen, rc, "%s: the public half does not match the seed "
                "(damaged, or assembled from two keys)", path);
  return rc ? errf(err, errlen, rc, "%s: %s", path, sg_strerror(rc)) : 0;
}

/* Writes the key under a unique temporary name, then link()s it into place:
 * unlike rename(), link() fails if the name exists, so a key that appeared
 * meanwhile (another process) is never replaced; the file under the final
 * name is complete from the moment it exists. Returns -EEXIST if we lost.
 * (So the data directory must be on a file system with hard links.) */
static int write_new_key(const char *dir, const char *path, const sg__keypair *kp,
                         char *err, size_t errlen) {
  char tmp[PATH_MAX];
  if (snprintf(tmp, sizeof tmp, "%s/.%s.%ld.%08x.tmp", dir, SG_KEYS_FILE_NAME,
               (long)getpid(), randombytes_random()) >= (int)sizeof tmp)
    return errf(err, errlen, SG_EINVAL, "data directory path too long: %s", dir);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return errf(err, errlen, -errno, "cannot create %s: %s", tmp, strerror(errno));
  int rc = io_full(fd, kp->sk, SG_KEYS_SECRET_BYTES, 1);
  if (!rc && fsync(fd) != 0) rc = -errno;
  if (close(fd) != 0 && !rc) rc = -errno;
  if (!rc && link(tmp, path) != 0) rc = -errno;
  unlink(tmp);
  if (rc && rc != -EEXIST)
    return errf(err, errlen, rc, "cannot write %s: %s", path, sg_strerror(rc));
  return rc;
}

/* Makes the new directory entry durable; best effort, as some file systems
 * cannot fsync a directory and the key itself is already on disk. */
static void sync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)fsync(fd);
  close(fd);
}

static int create_file(const char *dir, const char *path, sg__keypair **out,
                       char *err, size_t errlen) {
  sg__keypair *kp;
  int rc = sg__keys_generate(&kp);
  if (rc) return errf(err, errlen, rc, "cannot generate a key: %s", sg_strerror(rc));
  rc = write_new_key(dir, path, kp, err, errlen);
  if (rc) {
    sg__keys_free(kp);
    return rc;
  }
  sync_dir(dir);
  *out = kp;
  return 0;
}

int sg__keys_load_or_create(const char *data_dir, sg__keypair **out, char *err,
                           size_t errlen) {
  char path[PATH_MAX];
  if (!data_dir || !*data_dir || !out)
    return errf(err, errlen, SG_EINVAL, "no data directory given");
  int rc = sodium_ready(err, errlen);
  if (rc) return rc;
  if (snprintf(path, sizeof path, "%s/%s", data_dir, SG_KEYS_FILE_NAME) >=
      (int)sizeof path)
    return errf(err, errlen, SG_EINVAL, "data directory path too long: %s", data_dir);
  rc = ensure_dir(data_dir, err, errlen);
  if (rc) return rc;
  /* Twice at most: if another process creates the key between our load and
   * our link, the second round loads theirs. */
  for (int round = 0; round < 2; round++) {
    rc = load_file(path, out, err, errlen);
    if (rc != -ENOENT) return rc;
    rc = create_file(data_dir, path, out, err, errlen);
    if (rc != -EEXIST) return rc;
  }
  return errf(err, errlen, SG_EKEY, "%s keeps appearing and vanishing", path);
}
