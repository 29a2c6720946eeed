/* treeops_forest: a Triton backend (C, no Python in the request path) that scores a tl2cgen forest.
 *
 * Built by export/native_backend.py into each version folder as libtriton_treeops_forest.so, next to
 * forest.so (export/compiled_forest.py). Triton looks for a model's backend library in the version
 * folder first, so every version carries the exact backend it was exported with.
 *
 * Load (TRITONBACKEND_ModelInitialize), in this order, any failure refusing the version with one line:
 * 1. every file recorded in the version's treeops.json "files" (size and SHA-256, written at export)
 *    is checked BEFORE anything is mapped: a truncated forest.so would otherwise kill tritonserver
 *    with SIGBUS; now only that version is UNAVAILABLE and the reason names the file;
 * 2. dlopen forest.so: predict_rows, treeops_width, treeops_n_features;
 * 3. the model config (TRITONBACKEND_ModelConfig as JSON) must declare one FP32 input [n_features] and
 *    one FP32 output [width] as the forest reports them, named as treeops.json records.
 * What was loaded is freed on every failure path.
 *
 * Execute: each request's one FP32 input [rows, n_features] is gathered into one batch, scored in one
 * predict_rows call (each row alone: its bits never depend on the batch), and every requested output
 * gets its rows as FP32 [rows, width]. Statistics follow tritonbackend.h's definitions (see
 * TRITONBACKEND_ModelInstanceReportStatistics): exec_start before the inputs are read, compute_start
 * after they are gathered, compute_end after scoring, exec_end after outputs are written and
 * responses sent; so Triton's compute_input / compute_infer / compute_output are input, scoring and
 * output time, as for every other backend (and as perf_analyzer reports them).
 *
 * Only the Triton C API functions used here are declared below (as in tritonbackend.h and
 * tritonserver.h of TRITONBACKEND API 1.19, tritonserver 2.51); the library resolves them from the
 * running tritonserver. Built with -Wall -Wextra -Werror (export/native_backend.py).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- the Triton C API subset (opaque handles; enum values fixed by the API) ---- */
typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Message TRITONSERVER_Message;
typedef struct TRITONBACKEND_Backend TRITONBACKEND_Backend;
typedef struct TRITONBACKEND_Model TRITONBACKEND_Model;
typedef struct TRITONBACKEND_ModelInstance TRITONBACKEND_ModelInstance;
typedef struct TRITONBACKEND_Request TRITONBACKEND_Request;
typedef struct TRITONBACKEND_Response TRITONBACKEND_Response;
typedef struct TRITONBACKEND_Input TRITONBACKEND_Input;
typedef struct TRITONBACKEND_Output TRITONBACKEND_Output;

enum { TYPE_FP32 = 11 };                        /* TRITONSERVER_TYPE_FP32 */
enum { MEMORY_CPU = 0, MEMORY_CPU_PINNED = 1 }; /* TRITONSERVER_MEMORY_* */
enum { ERROR_INTERNAL = 1, ERROR_NOT_FOUND = 2, ERROR_INVALID_ARG = 3, ERROR_UNSUPPORTED = 5 };
enum { ARTIFACT_FILESYSTEM = 0 };               /* TRITONBACKEND_ARTIFACT_FILESYSTEM */
enum { RESPONSE_COMPLETE_FINAL = 1, REQUEST_RELEASE_ALL = 1 };
enum { LOG_ERROR = 2 };

/* The API this file is written against: Triton must have the same major and at least this minor. */
#define BACKEND_API_MAJOR 1u
#ifndef TREEOPS_BACKEND_API_MINOR
#define TREEOPS_BACKEND_API_MINOR 19u
#endif

#define EXPORT __attribute__((visibility("default")))

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* msg);
extern const char* TRITONSERVER_ErrorMessage(TRITONSERVER_Error* error);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONSERVER_LogMessage(int level, const char* filename, const int line, const char* msg);
extern TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* message, const char** base,
                                                              size_t* byte_size);
extern TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);
extern TRITONSERVER_Error* TRITONBACKEND_ApiVersion(uint32_t* major, uint32_t* minor);
extern TRITONSERVER_Error* TRITONBACKEND_ModelName(TRITONBACKEND_Model* model, const char** name);
extern TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model, int* artifact_type,
                                                        const char** location);
extern TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model, uint64_t* version);
extern TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model, const uint32_t config_version,
                                                    TRITONSERVER_Message** model_config);
extern TRITONSERVER_Error* TRITONBACKEND_ModelSetState(TRITONBACKEND_Model* model, void* state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelState(TRITONBACKEND_Model* model, void** state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(TRITONBACKEND_ModelInstance* instance,
                                                           TRITONBACKEND_Model** model);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, const bool success,
    const uint64_t exec_start_ns, const uint64_t compute_start_ns, const uint64_t compute_end_ns,
    const uint64_t exec_end_ns);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(
    TRITONBACKEND_ModelInstance* instance, const uint64_t batch_size, const uint64_t exec_start_ns,
    const uint64_t compute_start_ns, const uint64_t compute_end_ns, const uint64_t exec_end_ns);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInputCount(TRITONBACKEND_Request* request, uint32_t* count);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInputByIndex(TRITONBACKEND_Request* request, const uint32_t index,
                                                            TRITONBACKEND_Input** input);
extern TRITONSERVER_Error* TRITONBACKEND_RequestOutputCount(TRITONBACKEND_Request* request, uint32_t* count);
extern TRITONSERVER_Error* TRITONBACKEND_RequestOutputName(TRITONBACKEND_Request* request, const uint32_t index,
                                                          const char** output_name);
extern TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* request, uint32_t release_flags);
extern TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* input, const char** name,
                                                        int* datatype, const int64_t** shape,
                                                        uint32_t* dims_count, uint64_t* byte_size,
                                                        uint32_t* buffer_count);
extern TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* input, const uint32_t index,
                                                    const void** buffer, uint64_t* buffer_byte_size,
                                                    int* memory_type, int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseNew(TRITONBACKEND_Response** response,
                                                    TRITONBACKEND_Request* request);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response,
                                                       TRITONBACKEND_Output** output, const char* name,
                                                       const int datatype, const int64_t* shape,
                                                       const uint32_t dims_count);
extern TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output, void** buffer,
                                                     const uint64_t buffer_byte_size, int* memory_type,
                                                     int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response, const uint32_t send_flags,
                                                     TRITONSERVER_Error* error);

/* ---- errors and time ---- */
#define MSG_MAX 2048

static TRITONSERVER_Error* errorf(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static TRITONSERVER_Error* errorf(int code, const char* fmt, ...) {
  char msg[MSG_MAX];
  va_list args;
  va_start(args, fmt);
  vsnprintf(msg, sizeof msg, fmt, args);
  va_end(args);
  return TRITONSERVER_ErrorNew(code, msg);
}

/* Log `err` (if any) at error level and delete it. */
static void log_error(TRITONSERVER_Error* err, const char* what) {
  if (err == NULL) return;
  char msg[MSG_MAX];
  snprintf(msg, sizeof msg, "treeops_forest: %s: %s", what, TRITONSERVER_ErrorMessage(err));
  TRITONSERVER_Error* log_err = TRITONSERVER_LogMessage(LOG_ERROR, __FILE__, __LINE__, msg);
  if (log_err != NULL) TRITONSERVER_ErrorDelete(log_err);
  TRITONSERVER_ErrorDelete(err);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts); /* the clock of Triton's std::chrono::steady_clock */
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- SHA-256 (FIPS 180-4), to check version files against the manifest export wrote ---- */
static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t ror(uint32_t x, int r) { return (x >> r) | (x << (32 - r)); }

static void sha_block(uint32_t h[8], const unsigned char* p) {
  uint32_t w[64], s[8];
  for (int i = 0; i < 16; ++i)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 64; ++i)
    w[i] = w[i - 16] + (ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3)) + w[i - 7] +
           (ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10));
  memcpy(s, h, sizeof s);
  for (int i = 0; i < 64; ++i) {
    uint32_t t1 = s[7] + (ror(s[4], 6) ^ ror(s[4], 11) ^ ror(s[4], 25)) + ((s[4] & s[5]) ^ (~s[4] & s[6])) +
                  SHA_K[i] + w[i];
    uint32_t t2 = (ror(s[0], 2) ^ ror(s[0], 13) ^ ror(s[0], 22)) + ((s[0] & s[1]) ^ (s[0] & s[2]) ^ (s[1] & s[2]));
    memmove(s + 1, s, 7 * sizeof *s);
    s[4] += t1;
    s[0] = t1 + t2;
  }
  for (int i = 0; i < 8; ++i) h[i] += s[i];
}

/* Size and hex SHA-256 of the file at `path`, read with read(2) (never mapped); false if unreadable. */
static bool sha256_file(const char* path, uint64_t* size, char hex[65]) {
  enum { CHUNK = 1 << 16 };
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  FILE* f = fopen(path, "rb");
  unsigned char* buf = malloc(CHUNK + 128);
  if (f == NULL || buf == NULL) {
    if (f != NULL) fclose(f);
    free(buf);
    return false;
  }
  uint64_t total = 0;
  size_t carry = 0, got = 0;
  while ((got = fread(buf + carry, 1, CHUNK, f)) > 0) {
    total += got;
    size_t n = carry + got, full = n - n % 64;
    for (size_t i = 0; i < full; i += 64) sha_block(h, buf + i);
    carry = n - full;
    memmove(buf, buf + full, carry);
  }
  bool ok = !ferror(f);
  fclose(f);
  buf[carry++] = 0x80;
  if (carry > 56) {
    memset(buf + carry, 0, 64 - carry);
    sha_block(h, buf);
    carry = 0;
  }
  memset(buf + carry, 0, 56 - carry);
  for (int i = 0; i < 8; ++i) buf[56 + i] = (unsigned char)((total * 8) >> (56 - 8 * i));
  sha_block(h, buf);
  free(buf);
  for (int i = 0; i < 8; ++i) snprintf(hex + 8 * i, 9, "%08x", h[i]);
  *size = total;
  return ok;
}

/* ---- a small JSON reader (model config and treeops.json): values are located, never copied ---- */
typedef struct {
  const char* p; /* NUL-terminated text */
} Json;

static void json_ws(Json* j) {
  while (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t') j->p++;
}

static bool json_lit(Json* j, char c) {
  json_ws(j);
  if (*j->p != c) return false;
  j->p++;
  return true;
}

/* A string into `out` (`cap` bytes; NULL skips it); \u escapes become '?' (names here are ASCII). */
static bool json_string(Json* j, char* out, size_t cap) {
  json_ws(j);
  if (*j->p != '"') return false;
  size_t n = 0;
  for (j->p++; *j->p != '"'; j->p++) {
    char c = *j->p;
    if (c == '\0') return false;
    if (c == '\\') {
      c = *++j->p;
      if (c == '\0') return false;
      if (c == 'u') {
        for (int k = 0; k < 4; ++k)
          if (*++j->p == '\0') return false;
        c = '?';
      } else if (c == 'n') c = '\n';
      else if (c == 't') c = '\t';
      else if (c == 'r') c = '\r';
      else if (c == 'b') c = '\b';
      else if (c == 'f') c = '\f';
    }
    if (out != NULL) {
      if (n + 1 >= cap) return false;
      out[n++] = c;
    }
  }
  j->p++;
  if (out != NULL) out[n] = '\0';
  return true;
}

static bool json_skip(Json* j, int depth) {
  json_ws(j);
  const char c = *j->p;
  if (c == '"') return json_string(j, NULL, 0);
  if (c == '{' || c == '[') {
    const char close = c == '{' ? '}' : ']';
    if (depth > 64) return false;
    j->p++;
    if (json_lit(j, close)) return true;
    do {
      if (c == '{' && !(json_string(j, NULL, 0) && json_lit(j, ':'))) return false;
      if (!json_skip(j, depth + 1)) return false;
    } while (json_lit(j, ','));
    return json_lit(j, close);
  }
  const char* start = j->p;
  while (*j->p != '\0' && strchr("+-.0123456789eEtruefalsn", *j->p) != NULL) j->p++;
  return j->p > start;
}

/* `*value` = member `key` of the object at `o`; false if `o` is not an object or has no such member. */
static bool json_member(Json o, const char* key, Json* value) {
  char name[512];
  if (!json_lit(&o, '{') || json_lit(&o, '}')) return false;
  do {
    if (!json_string(&o, name, sizeof name) || !json_lit(&o, ':')) return false;
    if (strcmp(name, key) == 0) {
      json_ws(&o);
      *value = o;
      return true;
    }
    if (!json_skip(&o, 0)) return false;
  } while (json_lit(&o, ','));
  return false;
}

/* Element count of the array at `a` (-1 if it is not an array); `*first` = its first element. */
static int json_array(Json a, Json* first) {
  if (!json_lit(&a, '[')) return -1;
  *first = a;
  if (json_lit(&a, ']')) return 0;
  int n = 0;
  do {
    if (!json_skip(&a, 0)) return -1;
    n++;
  } while (json_lit(&a, ','));
  return json_lit(&a, ']') ? n : -1;
}

/* Step `*item` past its element and the comma after it. */
static void json_next(Json* item) {
  json_skip(item, 0);
  json_lit(item, ',');
}

/* An integer, plain or quoted (protobuf's JSON writes int64 as strings). */
static bool json_int(Json v, int64_t* out) {
  json_ws(&v);
  const bool quoted = json_lit(&v, '"');
  char* stop = NULL;
  long long x = strtoll(v.p, &stop, 10);
  if (stop == v.p) return false;
  v.p = stop;
  if (quoted && !json_lit(&v, '"')) return false;
  *out = x;
  return true;
}

static bool json_member_string(Json o, const char* key, char* out, size_t cap) {
  Json v;
  return json_member(o, key, &v) && json_string(&v, out, cap);
}

static bool json_member_int(Json o, const char* key, int64_t* out) {
  Json v;
  return json_member(o, key, &v) && json_int(v, out);
}

/* The whole file at `path` as a NUL-terminated string (caller frees), or NULL. */
static char* read_text(const char* path) {
  FILE* f = fopen(path, "rb");
  if (f == NULL) return NULL;
  char* text = NULL;
  size_t size = 0, cap = 0, got = 0;
  do {
    if (size + 4096 + 1 > cap) {
      cap = (size + 4096 + 1) * 2;
      char* grown = realloc(text, cap);
      if (grown == NULL) break;
      text = grown;
    }
    got = fread(text + size, 1, cap - size - 1, f);
    size += got;
  } while (got > 0);
  const bool ok = text != NULL && !ferror(f) && size + 1 <= cap;
  fclose(f);
  if (!ok) {
    free(text);
    return NULL;
  }
  text[size] = '\0';
  return text;
}

/* ---- the version: its identity, its files and its forest ---- */
#define METADATA_FILE "treeops.json"
#define FOREST_FILE "forest.so"

typedef void (*predict_rows_fn)(const float* x, int64_t rows, float* out);
typedef int (*int_fn)(void);

typedef struct {
  void* library;
  predict_rows_fn predict_rows;
  int64_t width;
  int64_t n_features;
} Forest;

typedef struct {
  const char* model;
  char dir[4096];   /* <repository>/<model>/<version> */
  char where[4200]; /* "model 'm' version 3" for messages */
} Version;

static void forest_free(Forest* forest) {
  if (forest == NULL) return;
  if (forest->library != NULL) dlclose(forest->library);
  free(forest);
}

/* Every file of the manifest must exist with the recorded size and SHA-256, forest.so among them. */
static TRITONSERVER_Error* verify_files(const Version* v, Json metadata) {
  Json files;
  if (!json_member(metadata, "files", &files) || !json_lit(&files, '{'))
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s/" METADATA_FILE " has no \"files\" manifest (sizes "
                  "and SHA-256 written at export); re-export the version with treeops export", v->where, v->dir);
  bool forest_listed = false;
  if (!json_lit(&files, '}')) {
    do {
      char name[512], want_sha[80], path[4700], got_sha[65];
      int64_t want_size = -1;
      uint64_t got_size = 0;
      Json entry;
      if (!json_string(&files, name, sizeof name) || !json_lit(&files, ':'))
        return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the \"files\" manifest of %s/" METADATA_FILE
                      " is malformed; re-export the version", v->where, v->dir);
      entry = files;
      if (!json_skip(&files, 0) || !json_member_int(entry, "size", &want_size) ||
          !json_member_string(entry, "sha256", want_sha, sizeof want_sha))
        return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the manifest entry of '%s' lacks size/sha256; "
                      "re-export the version", v->where, name);
      if (name[0] == '/' || strstr(name, "..") != NULL)
        return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the manifest names '%s', outside the version "
                      "folder; re-export the version", v->where, name);
      forest_listed |= strcmp(name, FOREST_FILE) == 0;
      snprintf(path, sizeof path, "%s/%s", v->dir, name);
      if (!sha256_file(path, &got_size, got_sha))
        return errorf(ERROR_NOT_FOUND, "treeops_forest: %s: cannot read %s, listed in " METADATA_FILE "; the "
                      "version is incomplete: re-export or `treeops sync` it", v->where, path);
      if ((int64_t)got_size != want_size)
        return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s has %llu bytes but " METADATA_FILE " records "
                      "%lld (truncated or replaced); re-export or `treeops sync` the version", v->where, path,
                      (unsigned long long)got_size, (long long)want_size);
      if (strcmp(got_sha, want_sha) != 0)
        return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s has SHA-256 %s but " METADATA_FILE " records "
                      "%s (the file changed after export); re-export or `treeops sync` the version", v->where,
                      path, got_sha, want_sha);
    } while (json_lit(&files, ','));
  }
  if (!forest_listed)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the manifest in " METADATA_FILE " does not list "
                  FOREST_FILE "; re-export the version with --target native-compiled", v->where);
  return NULL;
}

static TRITONSERVER_Error* open_forest(const Version* v, Forest* forest) {
  char path[4200];
  snprintf(path, sizeof path, "%s/" FOREST_FILE, v->dir);
  forest->library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (forest->library == NULL)
    return errorf(ERROR_NOT_FOUND, "treeops_forest: %s: cannot load %s: %s (re-export the version with "
                  "--target native-compiled)", v->where, path, dlerror());
  forest->predict_rows = (predict_rows_fn)dlsym(forest->library, "predict_rows");
  int_fn width = (int_fn)dlsym(forest->library, "treeops_width");
  int_fn n_features = (int_fn)dlsym(forest->library, "treeops_n_features");
  if (forest->predict_rows == NULL || width == NULL || n_features == NULL)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s lacks predict_rows/treeops_width/treeops_n_features "
                  "(not written by treeops export?)", v->where, path);
  forest->width = width();
  forest->n_features = n_features();
  return NULL;
}

/* One tensor of the config: the one entry of `list` ("input"/"output") named `want_name`, FP32, dims
 * [per_row] (or [-1, per_row] without batching), no reshape. */
static TRITONSERVER_Error* check_tensor(const Version* v, Json config, const char* list, const char* want_name,
                                        int64_t per_row, const char* per_row_what, bool batching) {
  Json tensors, t, reshape, reshape_shape, first_dim;
  char name[512] = "", dtype[64] = "";
  const int count = json_member(config, list, &tensors) ? json_array(tensors, &t) : -1;
  if (count != 1)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the model config declares %d %s tensors; the forest "
                  "has exactly one (rewrite config.pbtxt with `treeops sync`)", v->where, count < 0 ? 0 : count, list);
  json_member_string(t, "name", name, sizeof name);
  json_member_string(t, "data_type", dtype, sizeof dtype);
  if (strcmp(name, want_name) != 0)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config %s name is '%s' but the version was exported "
                  "with '%s' (" METADATA_FILE "); rewrite config.pbtxt with `treeops sync`", v->where, list, name,
                  want_name);
  if (strcmp(dtype, "TYPE_FP32") != 0)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config %s '%s' data_type is %s; the forest takes and "
                  "gives TYPE_FP32 (rewrite config.pbtxt with `treeops sync`)", v->where, list, name, dtype);
  if (json_member(t, "reshape", &reshape) && json_member(reshape, "shape", &reshape_shape) &&
      json_array(reshape_shape, &first_dim) > 0)
    return errorf(ERROR_UNSUPPORTED, "treeops_forest: %s: config %s '%s' has a reshape; the forest does not "
                  "support one", v->where, list, name);
  Json dims, d;
  char got[128] = "[";
  const int n_dims = json_member(t, "dims", &dims) ? json_array(dims, &d) : -1;
  int64_t first = 0, second = 0;
  for (int i = 0; i < n_dims; ++i, json_next(&d)) {
    int64_t dim = 0;
    json_int(d, &dim);
    if (i == 0) first = dim;
    if (i == 1) second = dim;
    const size_t used = strlen(got);
    snprintf(got + used, sizeof got - used, "%s%lld", i ? ", " : "", (long long)dim);
  }
  strncat(got, "]", sizeof got - strlen(got) - 1);
  const bool ok = batching ? n_dims == 1 && first == per_row : n_dims == 2 && first == -1 && second == per_row;
  if (!ok)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config %s '%s' has dims %s but forest.so has %lld %s: "
                  "the dims must be %s%lld]; rewrite config.pbtxt with `treeops sync`", v->where, list, name, got,
                  (long long)per_row, per_row_what, batching ? "[" : "[-1, ", (long long)per_row);
  return NULL;
}

/* The model config must match the forest's width and feature count and the names export recorded. */
static TRITONSERVER_Error* check_config(TRITONBACKEND_Model* model, const Version* v, Json metadata,
                                        const Forest* forest) {
  char input_name[512], output_name[512];
  if (!json_member_string(metadata, "input_name", input_name, sizeof input_name) ||
      !json_member_string(metadata, "output_name", output_name, sizeof output_name))
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: " METADATA_FILE " lacks input_name/output_name; "
                  "re-export the version", v->where);
  TRITONSERVER_Message* message = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelConfig(model, 1, &message);
  if (err != NULL) return err;
  const char* base = NULL;
  size_t size = 0;
  char* text = NULL;
  if ((err = TRITONSERVER_MessageSerializeToJson(message, &base, &size)) == NULL) {
    if ((text = malloc(size + 1)) == NULL) {
      err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
    } else {
      memcpy(text, base, size);
      text[size] = '\0';
    }
  }
  log_error(TRITONSERVER_MessageDelete(message), "deleting the model config message");
  if (err != NULL) return err;
  Json config = {text};
  int64_t max_batch_size = 0;
  json_member_int(config, "max_batch_size", &max_batch_size);
  err = check_tensor(v, config, "input", input_name, forest->n_features, "features", max_batch_size > 0);
  if (err == NULL)
    err = check_tensor(v, config, "output", output_name, forest->width, "outputs per row", max_batch_size > 0);
  free(text);
  return err;
}

/* Check the version's files, load its forest and check the config against it; `*out` is set first, so
 * that the caller frees whatever was loaded when a later step fails. */
static TRITONSERVER_Error* load_version(TRITONBACKEND_Model* model, Forest** out) {
  Version v;
  int artifact = -1;
  const char* location = NULL;
  uint64_t version = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelName(model, &v.model);
  if (err == NULL) err = TRITONBACKEND_ModelRepository(model, &artifact, &location);
  if (err == NULL) err = TRITONBACKEND_ModelVersion(model, &version);
  if (err != NULL) return err;
  snprintf(v.where, sizeof v.where, "model '%s' version %llu", v.model, (unsigned long long)version);
  if (artifact != ARTIFACT_FILESYSTEM)
    return errorf(ERROR_UNSUPPORTED, "treeops_forest: %s: reads forest.so from a local folder; %s is not one",
                  v.where, location);
  if (snprintf(v.dir, sizeof v.dir, "%s/%llu", location, (unsigned long long)version) >= (int)sizeof v.dir)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: model path too long: %s", v.where, location);

  char metadata_path[4200];
  snprintf(metadata_path, sizeof metadata_path, "%s/" METADATA_FILE, v.dir);
  char* metadata_text = read_text(metadata_path);
  if (metadata_text == NULL)
    return errorf(ERROR_NOT_FOUND, "treeops_forest: %s: cannot read %s; re-export the version with treeops export",
                  v.where, metadata_path);
  Json metadata = {metadata_text};
  if ((*out = calloc(1, sizeof **out)) == NULL) err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  if (err == NULL) err = verify_files(&v, metadata); /* before anything of the version is mapped */
  if (err == NULL) err = open_forest(&v, *out);
  if (err == NULL) err = check_config(model, &v, metadata, *out);
  free(metadata_text);
  return err;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  (void)backend;
  uint32_t major = 0, minor = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ApiVersion(&major, &minor);
  if (err != NULL) return err;
  if (major != BACKEND_API_MAJOR || minor < TREEOPS_BACKEND_API_MINOR)
    return errorf(ERROR_UNSUPPORTED, "treeops_forest needs TRITONBACKEND API %u.%u or a later %u.x, but this "
                  "tritonserver has %u.%u: serve with tritonserver 2.51 or newer of major %u (nvidia-pytriton 0.7.0)",
                  BACKEND_API_MAJOR, TREEOPS_BACKEND_API_MINOR, BACKEND_API_MAJOR, major, minor, BACKEND_API_MAJOR);
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  Forest* forest = NULL;
  TRITONSERVER_Error* err = load_version(model, &forest);
  if (err == NULL) err = TRITONBACKEND_ModelSetState(model, forest);
  if (err != NULL) forest_free(forest); /* Triton never calls ModelFinalize for a model that failed here */
  return err;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelState(model, &state);
  if (err != NULL) return err;
  forest_free(state);
  return NULL;
}

/* ---- execution ---- */
typedef struct {
  TRITONBACKEND_Input* input;
  uint32_t buffer_count;
  int64_t rows;
  int64_t first_row; /* in the batch */
  bool failed;       /* answered with an error already */
} Part;

/* Check one request's input; on success `part` describes it. */
static TRITONSERVER_Error* request_input(const Forest* forest, TRITONBACKEND_Request* request, Part* part) {
  uint32_t n_inputs = 0, dims = 0;
  const char* name = NULL;
  int datatype = 0;
  const int64_t* shape = NULL;
  uint64_t byte_size = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInputCount(request, &n_inputs);
  if (err != NULL) return err;
  if (n_inputs != 1)
    return TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "treeops_forest takes exactly one input: the feature tensor");
  if ((err = TRITONBACKEND_RequestInputByIndex(request, 0, &part->input)) != NULL) return err;
  if ((err = TRITONBACKEND_InputProperties(part->input, &name, &datatype, &shape, &dims, &byte_size,
                                           &part->buffer_count)))
    return err;
  if (datatype != TYPE_FP32 || dims != 2 || shape[1] != forest->n_features || shape[0] <= 0)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: input '%s' must be FP32 [rows >= 1, %lld] as in the model's "
                  "config", name, (long long)forest->n_features);
  if ((uint64_t)shape[0] * (uint64_t)forest->n_features * sizeof(float) != byte_size)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: input '%s' holds %llu bytes, not the %lld x %lld floats of "
                  "its shape", name, (unsigned long long)byte_size, (long long)shape[0], (long long)forest->n_features);
  part->rows = shape[0];
  return NULL;
}

/* Copy one request's input buffers into `dst` (`byte_size` bytes), or point `*direct` at a lone CPU buffer. */
static TRITONSERVER_Error* gather_input(const Part* part, uint64_t byte_size, float* dst, const float** direct) {
  uint64_t offset = 0;
  for (uint32_t b = 0; b < part->buffer_count; ++b) {
    const void* piece = NULL;
    uint64_t piece_size = 0;
    int memory_type = MEMORY_CPU;
    int64_t memory_id = 0;
    TRITONSERVER_Error* err = TRITONBACKEND_InputBuffer(part->input, b, &piece, &piece_size, &memory_type, &memory_id);
    if (err != NULL) return err;
    if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED)
      return TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest scores CPU tensors only (instance kind CPU)");
    if (offset + piece_size > byte_size)
      return TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "treeops_forest: input buffers exceed the input's size");
    if (direct != NULL && part->buffer_count == 1) {
      *direct = piece;
      return NULL;
    }
    memcpy((char*)dst + offset, piece, piece_size);
    offset += piece_size;
  }
  return NULL;
}

/* Answer `request` with `failure` (kept by the caller, as the API says). Once sent, the response is Triton's:
 * a failed send is logged, never followed by TRITONBACKEND_ResponseDelete. */
static bool send_response(TRITONBACKEND_Response* response, TRITONSERVER_Error* failure) {
  TRITONSERVER_Error* send_err = TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, failure);
  const bool ok = send_err == NULL && failure == NULL;
  log_error(send_err, "sending a response");
  return ok;
}

static void answer_error(TRITONBACKEND_Request* request, TRITONSERVER_Error* failure) {
  TRITONBACKEND_Response* response = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ResponseNew(&response, request);
  if (err == NULL) send_response(response, failure);
  else log_error(err, "creating an error response");
  TRITONSERVER_ErrorDelete(failure);
}

/* Write `rows` x `width` scores into every output `request` asks for, and send its response. */
static bool respond(TRITONBACKEND_Request* request, const float* scores, int64_t rows, int64_t width) {
  TRITONBACKEND_Response* response = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ResponseNew(&response, request);
  if (err != NULL) {
    log_error(err, "creating a response");
    return false;
  }
  uint32_t n_outputs = 0;
  const int64_t shape[2] = {rows, width};
  const uint64_t bytes = (uint64_t)rows * (uint64_t)width * sizeof(float);
  err = TRITONBACKEND_RequestOutputCount(request, &n_outputs);
  for (uint32_t o = 0; o < n_outputs && err == NULL; ++o) {
    const char* name = NULL;
    TRITONBACKEND_Output* output = NULL;
    void* out = NULL;
    int memory_type = MEMORY_CPU;
    int64_t memory_id = 0;
    if ((err = TRITONBACKEND_RequestOutputName(request, o, &name))) break;
    if ((err = TRITONBACKEND_ResponseOutput(response, &output, name, TYPE_FP32, shape, 2))) break;
    if ((err = TRITONBACKEND_OutputBuffer(output, &out, bytes, &memory_type, &memory_id))) break;
    if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED) {
      err = TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest writes CPU tensors only");
      break;
    }
    memcpy(out, scores, bytes);
  }
  const bool ok = send_response(response, err);
  if (err != NULL) TRITONSERVER_ErrorDelete(err);
  return ok;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                              TRITONBACKEND_Request** requests,
                                                              const uint32_t request_count) {
  TRITONBACKEND_Model* model = NULL;
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
  if (err == NULL) err = TRITONBACKEND_ModelState(model, &state);
  Part* parts = err == NULL ? calloc(request_count, sizeof *parts) : NULL;
  if (err == NULL && parts == NULL) err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  if (err != NULL) return err; /* nothing answered yet: Triton answers every request with it and releases them */
  const Forest* forest = state;

  /* compute_input: check and gather every request's rows into one batch */
  const uint64_t exec_start = now_ns();
  int64_t batch_rows = 0;
  uint32_t good = 0;
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONSERVER_Error* bad = request_input(forest, requests[r], &parts[r]);
    if (bad != NULL) {
      parts[r].failed = true;
      answer_error(requests[r], bad);
      continue;
    }
    parts[r].first_row = batch_rows;
    batch_rows += parts[r].rows;
    good++;
  }
  const size_t row_bytes = (size_t)forest->n_features * sizeof(float);
  bool copy = good > 1; /* one request in one buffer is scored where it lies */
  for (uint32_t r = 0; r < request_count; ++r) copy |= !parts[r].failed && parts[r].buffer_count != 1;
  float* scores = malloc((size_t)batch_rows * (size_t)forest->width * sizeof(float) + 1);
  float* batch = copy ? malloc((size_t)batch_rows * row_bytes + 1) : NULL;
  const float* x = batch;
  const bool allocated = scores != NULL && (batch != NULL || !copy);
  for (uint32_t r = 0; r < request_count && allocated; ++r) {
    if (parts[r].failed) continue;
    float* dst = copy ? batch + parts[r].first_row * forest->n_features : NULL;
    TRITONSERVER_Error* bad = gather_input(&parts[r], (uint64_t)parts[r].rows * row_bytes, dst, copy ? NULL : &x);
    if (bad != NULL) { /* its rows stay in the batch as zeros, scored and dropped */
      if (dst != NULL) memset(dst, 0, (size_t)parts[r].rows * row_bytes);
      parts[r].failed = true;
      answer_error(requests[r], bad);
    }
  }

  /* compute_infer: score the batch */
  const uint64_t compute_start = now_ns();
  if (allocated && x != NULL && batch_rows > 0) forest->predict_rows(x, batch_rows, scores);
  const uint64_t compute_end = now_ns();

  /* compute_output: write each request's rows into its outputs and send its response */
  bool* ok = calloc(request_count, sizeof *ok);
  for (uint32_t r = 0; r < request_count; ++r) {
    if (parts[r].failed) continue;
    if (!allocated || x == NULL || ok == NULL) {
      answer_error(requests[r], TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory"));
      continue;
    }
    ok[r] = respond(requests[r], scores + parts[r].first_row * forest->width, parts[r].rows, forest->width);
  }
  const uint64_t exec_end = now_ns();

  uint64_t scored_rows = 0;
  for (uint32_t r = 0; r < request_count; ++r) {
    const bool success = ok != NULL && ok[r];
    scored_rows += success ? (uint64_t)parts[r].rows : 0;
    log_error(TRITONBACKEND_ModelInstanceReportStatistics(instance, requests[r], success, exec_start, compute_start,
                                                          compute_end, exec_end),
              "reporting request statistics");
    log_error(TRITONBACKEND_RequestRelease(requests[r], REQUEST_RELEASE_ALL), "releasing a request");
  }
  if (scored_rows > 0)
    log_error(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, scored_rows, exec_start, compute_start,
                                                               compute_end, exec_end),
              "reporting batch statistics");
  free(ok);
  free(scores);
  free(batch);
  free(parts);
  return NULL;
}
