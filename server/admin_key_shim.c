/* LD_PRELOAD shim for tritonserver: keeps the admin key off its command line.
 *
 * Triton 2.51 takes the restricted-API key only as part of --grpc-restricted-protocol and
 * --http-restricted-api, so `ps` (any user: /proc/<pid>/cmdline is world-readable) would show it.
 * The launcher passes TREEOPS_ADMIN_KEY_PLACEHOLDER in those flags instead and the key in the
 * environment variable TREEOPS_TRITON_ADMIN_KEY (/proc/<pid>/environ: owner and root only). Triton
 * parses its flags with getopt_long; this wrapper hands it the option value with the placeholder
 * replaced by the key. Nothing else changes: every other call goes to the real getopt_long.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLACEHOLDER "@TREEOPS_TRITON_ADMIN_KEY@"
#define KEY_ENV "TREEOPS_TRITON_ADMIN_KEY"

typedef int (*getopt_long_fn)(int, char *const[], const char *, const struct option *, int *);

int getopt_long(int argc, char *const argv[], const char *optstring, const struct option *longopts,
                int *longindex)
{
  static getopt_long_fn real = NULL;
  if (real == NULL) {
    real = (getopt_long_fn)dlsym(RTLD_NEXT, "getopt_long");
    if (real == NULL) {
      fprintf(stderr, "treeops admin-key shim: getopt_long not found: %s\n", dlerror());
      abort();
    }
  }
  int result = real(argc, argv, optstring, longopts, longindex);
  const char *at = optarg != NULL ? strstr(optarg, PLACEHOLDER) : NULL;
  if (at == NULL) {
    return result;
  }
  const char *key = getenv(KEY_ENV);
  if (key == NULL || key[0] == '\0') {
    fprintf(stderr, "treeops admin-key shim: %s is not set but a flag asks for it\n", KEY_ENV);
    exit(2);
  }
  size_t head = (size_t)(at - optarg), key_len = strlen(key), tail = strlen(at + strlen(PLACEHOLDER));
  char *value = malloc(head + key_len + tail + 1); /* kept: Triton copies optarg, the flag is parsed once */
  if (value == NULL) {
    abort();
  }
  memcpy(value, optarg, head);
  memcpy(value + head, key, key_len);
  memcpy(value + head + key_len, at + strlen(PLACEHOLDER), tail + 1);
  optarg = value;
  return result;
}
