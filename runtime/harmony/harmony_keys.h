/* The server's Ed25519 key pair for Harmony federation.
 *
 * On disk it is `<data_dir>/harmony.key`: the raw 64 bytes of libsodium's
 * crypto_sign secret key (32-byte seed, then the 32-byte public key), the
 * layout the reference server uses too, mode 0600. In memory the secret lives
 * in sodium_malloc'd pages, read-only once loaded, wiped when freed.
 *
 * Functions returning int return 0 or a negative code: SG_EKEY (the key
 * material is unusable; `err` says which file and what is wrong), SG_EINVAL,
 * SG_ENOMEM, or -errno (== libuv's UV_E* on Unix) for a failed system call.
 * `err` (may be NULL) receives a one-line message on failure.
 */
#ifndef SEGUE_HARMONY_KEYS_H
#define SEGUE_HARMONY_KEYS_H
#include <stddef.h>
#include <stdint.h>

#define SG_KEYS_SECRET_BYTES 64     /* crypto_sign_SECRETKEYBYTES */
#define SG_KEYS_SEED_BYTES 32       /* crypto_sign_SEEDBYTES */
#define SG_KEYS_PUBLIC_BYTES 32     /* crypto_sign_PUBLICKEYBYTES */
#define SG_KEYS_SIG_BYTES 64        /* crypto_sign_BYTES */
/* Base64 (standard, padded) of a public key, with its NUL. */
#define SG_KEYS_PUBLIC_B64_SIZE 45
#define SG_KEYS_FILE_NAME "harmony.key"

typedef struct sg__keypair sg__keypair;

/* Loads `<data_dir>/harmony.key`, or creates it (and `data_dir`, mode 0700)
 * when missing. An existing file that is not exactly 64 bytes, is readable or
 * writable by group or others, or whose public half does not match its seed
 * is SG_EKEY and is left untouched: it is never replaced. On success *out is
 * owned by the caller (sg__keys_free). */
int sg__keys_load_or_create(const char *data_dir, sg__keypair **out, char *err,
                           size_t errlen);

/* A key pair from key material held elsewhere (tests, scripts): `len` is 32
 * (a seed) or 64 (seed then public key; the public half must match, else
 * SG_EKEY). The input is copied; *out is owned by the caller. */
int sg__keys_from_secret(const unsigned char *secret, size_t len,
                        sg__keypair **out, char *err, size_t errlen);

/* A fresh random key pair; nothing is written to disk. *out is owned by the
 * caller. */
int sg__keys_generate(sg__keypair **out);

/* Wipes and frees; NULL is allowed. */
void sg__keys_free(sg__keypair *kp);

/* The 32-byte public key, valid as long as `kp`. */
const unsigned char *sg__keys_public(const sg__keypair *kp);

/* Copies the 64-byte secret key into `out`; the caller wipes it
 * (sodium_memzero) when done. Exists for keygen in scripts and for tests. */
void sg__keys_export_secret(const sg__keypair *kp,
                           unsigned char out[SG_KEYS_SECRET_BYTES]);

/* Ed25519 detached signature of msg[0..len) into `sig`. Returns 0 or
 * SG_EINVAL. */
int sg__keys_sign(const sg__keypair *kp, const unsigned char *msg, size_t len,
                 unsigned char sig[SG_KEYS_SIG_BYTES]);

/* The public key as standard padded base64 into out[outlen], NUL-terminated;
 * outlen must be at least SG_KEYS_PUBLIC_B64_SIZE, else SG_EINVAL. */
int sg__keys_public_b64(const sg__keypair *kp, char *out, size_t outlen);

/* Internal to the harmony runtime files: formats a one-line message into
 * err[errlen] (err may be NULL) and returns `code`. */
int sg__harmony_errf(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
