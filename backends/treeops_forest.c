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
 *    one FP32 output [width] as the forest reports them, named as treeops.json records;
 * 4. the prediction log's settings (environment), the features' names (feature_spec.json, else f0..fN-1) and
 *    the declared metrics (config parameter treeops_metrics) are read and the metrics registered.
 * What was loaded is freed on every failure path.
 *
 * Execute: each request's one FP32 input [rows, n_features] is gathered into one batch, scored in one
 * predict_rows call (each row alone: its bits never depend on the batch), and every requested output
 * gets its rows as FP32 [rows, width]. Statistics follow tritonbackend.h's definitions (see
 * TRITONBACKEND_ModelInstanceReportStatistics): exec_start before the inputs are read, compute_start
 * after they are gathered, compute_end after scoring, exec_end after outputs are written and
 * responses sent; so Triton's compute_input / compute_infer / compute_output are input, scoring and
 * output time, as for every other backend (and as perf_analyzer reports them). A request the backend refuses
 * is answered with its error after the batch is scored, with the others.
 *
 * What it records, as the Python-backend models do (backends/serving_monitor.py, prediction_log.py):
 * - the metrics declared in the config parameter treeops_metrics (monitoring/metric_names.py via export), through
 *   Triton's custom-metrics API on its metrics port: the request-duration histogram (execute start to the
 *   response sent, answered requests), rows per decision at the served threshold (treeops.json objective), and
 *   the prediction-log records dropped (a failed write); updated in execute (in-process calls, no publisher);
 * - with TREEOPS_PREDICTION_LOG_DIR set, the prediction log: per-instance journal segments (see "the prediction
 *   log" below), written before the responses are sent; sampling by crc32(request id) < rate * 2^32.
 * The first requests of each instance that Triton's model_warmup sends (sum of batch_size x count) are neither
 * counted nor logged.
 *
 * Only the Triton C API functions used here are declared below (as in tritonbackend.h and
 * tritonserver.h of TRITONBACKEND API 1.19, tritonserver 2.51); the library resolves them from the
 * running tritonserver. Built with -Wall -Wextra -Werror (export/native_backend.py).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

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

enum { TYPE_BOOL = 1, TYPE_INT64 = 9, TYPE_FP32 = 11, TYPE_FP64 = 12, TYPE_BYTES = 13 }; /* TRITONSERVER_TYPE_* */
enum { MEMORY_CPU = 0, MEMORY_CPU_PINNED = 1 }; /* TRITONSERVER_MEMORY_* */
enum { ERROR_INTERNAL = 1, ERROR_NOT_FOUND = 2, ERROR_INVALID_ARG = 3, ERROR_UNAVAILABLE = 4, ERROR_UNSUPPORTED = 5 };
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
extern int TRITONSERVER_ErrorCode(TRITONSERVER_Error* error);
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
extern TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* request, const char* name,
                                                      TRITONBACKEND_Input** input);
extern TRITONSERVER_Error* TRITONBACKEND_RequestParameterCount(TRITONBACKEND_Request* request, uint32_t* count);
extern TRITONSERVER_Error* TRITONBACKEND_RequestParameter(TRITONBACKEND_Request* request, const uint32_t index,
                                                          const char** key, int* type, const void** vvalue);
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
extern TRITONSERVER_Error* TRITONBACKEND_RequestId(TRITONBACKEND_Request* request, const char** id);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceName(TRITONBACKEND_ModelInstance* instance, const char** name);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceSetState(TRITONBACKEND_ModelInstance* instance, void* state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceState(TRITONBACKEND_ModelInstance* instance, void** state);

/* Custom metrics (tritonserver.h; histograms since 2.51's API). */
typedef struct TRITONSERVER_Parameter TRITONSERVER_Parameter;
typedef struct TRITONSERVER_MetricFamily TRITONSERVER_MetricFamily;
typedef struct TRITONSERVER_Metric TRITONSERVER_Metric;
typedef struct TRITONSERVER_MetricArgs TRITONSERVER_MetricArgs;
enum { METRIC_COUNTER = 0, METRIC_GAUGE = 1, METRIC_HISTOGRAM = 2 }; /* TRITONSERVER_METRIC_KIND_* */
enum { PARAMETER_STRING = 0, PARAMETER_BOOL = 2 };                /* TRITONSERVER_PARAMETER_* */
extern TRITONSERVER_Parameter* TRITONSERVER_ParameterNew(const char* name, const int type, const void* value);
extern void TRITONSERVER_ParameterDelete(TRITONSERVER_Parameter* parameter);
extern TRITONSERVER_Error* TRITONSERVER_MetricFamilyNew(TRITONSERVER_MetricFamily** family, const int kind,
                                                       const char* name, const char* description);
extern TRITONSERVER_Error* TRITONSERVER_MetricFamilyDelete(TRITONSERVER_MetricFamily* family);
extern TRITONSERVER_Error* TRITONSERVER_MetricArgsNew(TRITONSERVER_MetricArgs** args);
extern TRITONSERVER_Error* TRITONSERVER_MetricArgsSetHistogram(TRITONSERVER_MetricArgs* args, const double* buckets,
                                                              const uint64_t buckets_count);
extern TRITONSERVER_Error* TRITONSERVER_MetricArgsDelete(TRITONSERVER_MetricArgs* args);
extern TRITONSERVER_Error* TRITONSERVER_MetricNewWithArgs(TRITONSERVER_Metric** metric,
                                                         TRITONSERVER_MetricFamily* family,
                                                         const TRITONSERVER_Parameter** labels,
                                                         const uint64_t label_count,
                                                         const TRITONSERVER_MetricArgs* args);
extern TRITONSERVER_Error* TRITONSERVER_MetricDelete(TRITONSERVER_Metric* metric);
extern TRITONSERVER_Error* TRITONSERVER_MetricIncrement(TRITONSERVER_Metric* metric, double value);
extern TRITONSERVER_Error* TRITONSERVER_MetricObserve(TRITONSERVER_Metric* metric, double value);

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

static bool json_double(Json v, double* out) {
  json_ws(&v);
  char* stop = NULL;
  const double x = strtod(v.p, &stop);
  if (stop == v.p) return false;
  *out = x;
  return true;
}

/* ---- CRC-32 (IEEE, as Python's zlib.crc32): the log's sampling rule and its record frames ---- */
static uint32_t CRC_TABLE[256];

static void crc32_init(void) {
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    CRC_TABLE[n] = c;
  }
}

static uint32_t crc32_of(const void* data, size_t n) {
  const unsigned char* p = data;
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = CRC_TABLE[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/* ---- the prediction log's settings: the environment variables of backends/prediction_log.py Settings ----
 * Names, defaults and the contract version come from that module at build time (export/native_backend.py). */
#if !defined(TREEOPS_LOG_DIR_ENV) || !defined(TREEOPS_LOG_SAMPLE_RATE_ENV) || !defined(TREEOPS_LOG_MAX_BYTES_ENV) || \
    !defined(TREEOPS_LOG_SAMPLE_RATE_DEFAULT) || !defined(TREEOPS_LOG_MAX_BYTES_DEFAULT) ||                         \
    !defined(TREEOPS_LOG_CONTRACT) || !defined(TREEOPS_JOURNAL_MAGIC) || !defined(TREEOPS_JOURNAL_FORMAT) ||         \
    !defined(TREEOPS_METRICS_PARAMETER)
#error "build with export/native_backend.py build_backend: it defines the prediction log's and metrics' contract"
#endif

typedef struct {
  char root[4096]; /* "" = the log is off */
  double sample_rate;
  int64_t max_bytes;
} LogSettings;

static TRITONSERVER_Error* bad_setting(const char* key, const char* text, const char* what) {
  return errorf(ERROR_INVALID_ARG, "treeops_forest: %s='%s' in tritonserver's environment is not %s: fix the "
                "TritonSettings prediction_log_* field (or the variable)", key, text, what);
}

static TRITONSERVER_Error* log_settings(LogSettings* s) {
  const char* root = getenv(TREEOPS_LOG_DIR_ENV);
  s->root[0] = '\0';
  if (root != NULL && root[0] != '\0' &&
      snprintf(s->root, sizeof s->root, "%s", root) >= (int)sizeof s->root)
    return bad_setting(TREEOPS_LOG_DIR_ENV, root, "a path shorter than 4096 bytes");
  const char* rate = getenv(TREEOPS_LOG_SAMPLE_RATE_ENV);
  char* stop = NULL;
  s->sample_rate = TREEOPS_LOG_SAMPLE_RATE_DEFAULT;
  if (rate != NULL) {
    s->sample_rate = strtod(rate, &stop);
    while (stop != rate && *stop == ' ') stop++;
    if (stop == rate || *stop != '\0' || !(s->sample_rate >= 0.0 && s->sample_rate <= 1.0))
      return bad_setting(TREEOPS_LOG_SAMPLE_RATE_ENV, rate, "a float in 0.0..1.0");
  }
  const char* max_bytes = getenv(TREEOPS_LOG_MAX_BYTES_ENV);
  s->max_bytes = TREEOPS_LOG_MAX_BYTES_DEFAULT;
  if (max_bytes != NULL) {
    s->max_bytes = strtoll(max_bytes, &stop, 10);
    while (stop != max_bytes && *stop == ' ') stop++;
    if (stop == max_bytes || *stop != '\0' || s->max_bytes < 1)
      return bad_setting(TREEOPS_LOG_MAX_BYTES_ENV, max_bytes, "an int in >= 1");
  }
  return NULL;
}

/* Whether a request of this id is logged (backends/prediction_log.py `sampled`: the same for every retry). */
static bool sampled(const char* request_id, size_t n, double rate) {
  return rate >= 1.0 || (double)crc32_of(request_id, n) < rate * 4294967296.0;
}

/* `s` as a JSON string into `out` (at least 6 * strlen(s) + 3 bytes); returns the bytes written. */
static size_t json_quote(char* out, const char* s) {
  size_t n = 0;
  out[n++] = '"';
  for (const unsigned char* p = (const unsigned char*)s; *p; ++p) {
    if (*p == '"' || *p == '\\') {
      out[n++] = '\\';
      out[n++] = (char)*p;
    } else if (*p < 0x20) {
      n += (size_t)sprintf(out + n, "\\u%04x", *p);
    } else {
      out[n++] = (char)*p;
    }
  }
  out[n++] = '"';
  return n;
}

/* mkdir -p `path` (0755). */
static bool make_dirs(const char* path) {
  char buf[4600];
  if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return false;
  for (char* p = buf + 1; *p; ++p) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return false;
    *p = '/';
  }
  return mkdir(buf, 0755) == 0 || errno == EEXIST;
}

/* ---- the version: its identity, its files and its forest ---- */
#define METADATA_FILE "treeops.json"
#define FOREST_FILE "forest.so"
#define FEATURES_FILE "feature_spec.json"

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
static TRITONSERVER_Error* check_config(const Version* v, Json config, Json metadata, const Forest* forest) {
  char input_name[512], output_name[512];
  if (!json_member_string(metadata, "input_name", input_name, sizeof input_name) ||
      !json_member_string(metadata, "output_name", output_name, sizeof output_name))
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: " METADATA_FILE " lacks input_name/output_name; "
                  "re-export the version", v->where);
  int64_t max_batch_size = 0;
  json_member_int(config, "max_batch_size", &max_batch_size);
  TRITONSERVER_Error* err =
      check_tensor(v, config, "input", input_name, forest->n_features, "features", max_batch_size > 0);
  if (err == NULL)
    err = check_tensor(v, config, "output", output_name, forest->width, "outputs per row", max_batch_size > 0);
  return err;
}

/* ---- raw transactions: history features from the online store (online.json) ----
 * A version folder holding online.json (written by export/native_online.py) is the raw-transaction model: its
 * inputs are the raw fields (BYTES, INT64, FP64; [rows, 1] each), not the feature tensor. Per execute call, as
 * backends/online_model.py does in the Python backend:
 * 1. each request's fields are read and checked; a request with a field that is not UTF-8 text, a negative or
 *    non-finite value of a non_negative field, or a time outside 1990-01-01..2200-01-01 UTC is refused alone
 *    (INVALID_ARG naming the field and its row) and nothing of it reaches the store;
 * 2. one Redis round trip (hiredis): the script of backends/online_history.py (EVALSHA; SCRIPT LOAD on NOSCRIPT and
 *    once more), one call per SCRIPT_ROWS rows, pipelined, with the keys and arguments OnlineHistory sends, so the
 *    state is shared with the Python-backend model and answers are the same; rows of a request with the parameter
 *    treeops_read_only true only read;
 * 3. every row's aggregates from the script's reply in float64 as OnlineHistory._row computes them (sums left to
 *    right in (time, value) order), the stateless features (online.json "op"s: the Polars expressions of
 *    export/raw_graph.py BUILDERS) and the vocabularies (unknown -> NaN), each cast to float32;
 * 4. the forest, then `probabilities` and `treeops_degraded` (BOOL [rows, 1]).
 * It does not write the prediction log yet: with TREEOPS_PREDICTION_LOG_DIR set its load is refused (see
 * serving_state), so no record is silently lost.
 * The store unreachable: config parameter on_store_unavailable "error" answers UNAVAILABLE naming the store URL (its
 * password hidden; a retry is safe: a transaction_id already stored changes nothing); "score_without_history" scores
 * with the history features NaN, flags the rows degraded and counts the requests (degraded_answers metric).
 * Environment: TREEOPS_ONLINE_STORE_URL (redis://[user:password@]host[:port][/db] or unix:///path),
 * TREEOPS_ONLINE_STORE_TIMEOUT_S (connect and per reply, default 1), TREEOPS_ONLINE_STORE_RETRIES (immediate
 * reconnects on a dropped connection, default 1; none after a timeout). */
#define ONLINE_FILE "online.json"
#define URL_ENV "TREEOPS_ONLINE_STORE_URL"
#define TIMEOUT_ENV "TREEOPS_ONLINE_STORE_TIMEOUT_S"
#define RETRIES_ENV "TREEOPS_ONLINE_STORE_RETRIES"
#define READ_ONLY_PARAMETER "treeops_read_only"
#define DEGRADED_OUTPUT "treeops_degraded"
enum { SCRIPT_ROWS = 512 };
enum { FIELD_INT64, FIELD_DOUBLE, FIELD_STRING, N_FIELD_KINDS };
enum { OP_LOG1P_CLIP0, OP_HOUR_OF_DAY, OP_ISO_WEEKDAY, OP_IS_WEEKEND, OP_CATEGORY, OP_HISTORY, N_OPS };
enum { AGG_COUNT, AGG_SUM, AGG_MEAN, AGG_SINCE_PREV, AGG_RATIO, N_AGGREGATES };
static const char* const FIELD_KINDS[] = {"int64", "double", "string"};
static const char* const FIELD_CONFIG_TYPES[] = {"TYPE_INT64", "TYPE_FP64", "TYPE_STRING"};
static const int FIELD_DATATYPES[] = {TYPE_INT64, TYPE_FP64, TYPE_BYTES};
static const char* const OPS[] = {"log1p_clip0", "hour_of_day", "iso_weekday", "is_weekend", "category", "history"};
static const char* const AGGREGATES[] = {"count", "sum", "mean", "seconds_since_prev", "ratio_to_mean"};
static const int64_t MIN_TIME_US = 631152000000000ll;  /* 1990-01-01T00:00:00Z */
static const int64_t MAX_TIME_US = 7258118400000000ll; /* 2200-01-01T00:00:00Z */
static const int64_t US_PER_DAY = 86400000000ll, US_PER_HOUR = 3600000000ll;

typedef struct {
  const char* p;
  uint32_t n;
} Str;

typedef struct {
  char name[256];
  int kind;
  bool non_negative;
} Field;

typedef struct {
  int op, field, aggregate, column; /* column: 0 time, 1 + value column */
  int64_t window_us;
  Str* vocabulary; /* op category: sorted by bytes */
  int n_vocabulary;
} Plan;

typedef struct {
  Field* fields;
  int n_fields, entity, time, txn;
  int* values; /* the field of each value column, in member order */
  int n_values;
  Plan* plan; /* one per forest feature, in forest column order */
  int n_plan;
  char prefix[600]; /* "<namespace>:{" */
  char max_window[32], retention[32];
  char* script;
  char sha[48];
  bool degrade; /* on_store_unavailable = score_without_history */
  char shown[8300]; /* the URL with its password as *** */
  char host[2048], socket[2048], user[2048], password[2048];
  int port, db, retries;
  struct timeval timeout;
  TRITONSERVER_MetricFamily* degraded_family;
  TRITONSERVER_Metric* degraded;
} Online;

/* The raw fields of one batch. */
typedef struct {
  void** col;      /* per field: int64_t*, double* or Str* over the batch's rows */
  char** copies;   /* BYTES inputs copied out of several buffers */
  uint32_t n_copies;
  bool* update;    /* per row: false for a read-only request's rows */
  char* tokens;    /* per row: its int64 entity / transaction id as text (24 bytes each) */
} Raw;

static void raw_free(Raw* raw, int n_fields) {
  for (int i = 0; raw->col != NULL && i < n_fields; ++i) free(raw->col[i]);
  for (uint32_t k = 0; k < raw->n_copies; ++k) free(raw->copies[k]);
  free(raw->col);
  free(raw->copies);
  free(raw->update);
  free(raw->tokens);
}

/* A field's value of row `r` as the text Redis receives (OnlineHistory: str(int), bytes as they are) and the log
 * records (`text` holds a number's). */
static Str field_text(const Online* o, const Raw* raw, int field, int64_t r, char text[24]) {
  if (o->fields[field].kind == FIELD_STRING) return ((const Str*)raw->col[field])[r];
  const int n = snprintf(text, 24, "%lld", (long long)((const int64_t*)raw->col[field])[r]);
  return (Str){text, (uint32_t)n};
}

static void online_free(Online* o) {
  if (o == NULL) return;
  if (o->degraded != NULL) log_error(TRITONSERVER_MetricDelete(o->degraded), "deleting a metric");
  if (o->degraded_family != NULL)
    log_error(TRITONSERVER_MetricFamilyDelete(o->degraded_family), "deleting a metric family");
  for (int i = 0; o->plan != NULL && i < o->n_plan; ++i) {
    for (int k = 0; k < o->plan[i].n_vocabulary; ++k) free((char*)o->plan[i].vocabulary[k].p);
    free(o->plan[i].vocabulary);
  }
  free(o->plan);
  free(o->fields);
  free(o->values);
  free(o->script);
  free(o);
}

static int field_index(const Online* o, const char* name) {
  for (int i = 0; i < o->n_fields; ++i)
    if (strcmp(o->fields[i].name, name) == 0) return i;
  return -1;
}

static int name_index(const char* const* names, int n, const char* name) {
  for (int i = 0; i < n; ++i)
    if (strcmp(names[i], name) == 0) return i;
  return -1;
}

static int str_cmp(const Str* a, const Str* b) {
  const int c = memcmp(a->p, b->p, a->n < b->n ? a->n : b->n);
  return c != 0 ? c : (a->n > b->n) - (a->n < b->n);
}

static int str_cmp_void(const void* a, const void* b) { return str_cmp(a, b); }

/* A JSON string member of `o` into a fresh buffer (caller frees), or NULL. */
static char* json_member_alloc(Json o, const char* key) {
  Json v;
  if (!json_member(o, key, &v)) return NULL;
  const size_t cap = strlen(v.p) + 1;
  char* out = malloc(cap);
  if (out != NULL && !json_string(&v, out, cap)) {
    free(out);
    out = NULL;
  }
  return out;
}

/* Split TREEOPS_ONLINE_STORE_URL into where to connect; `shown` hides the password. */
static TRITONSERVER_Error* store_url(Online* o, const char* where) {
  const char* url = getenv(URL_ENV);
  if (url == NULL || url[0] == '\0')
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: " URL_ENV " is not set in tritonserver's environment: "
                  "this raw-transaction model reads its history features from Redis; `treeops serve` sets it (or "
                  "starts a local redis-server), else export the URL before starting tritonserver", where);
  char rest[2048];
  o->port = 6379;
  if (strncmp(url, "unix://", 7) == 0) {
    snprintf(o->socket, sizeof o->socket, "%s", url + 7);
    char* q = strchr(o->socket, '?');
    if (q != NULL) {
      const char* db = strstr(q, "db=");
      if (db != NULL) o->db = atoi(db + 3);
      *q = '\0';
    }
    snprintf(o->shown, sizeof o->shown, "%s", url);
    return NULL;
  }
  if (strncmp(url, "redis://", 8) != 0 || snprintf(rest, sizeof rest, "%s", url + 8) >= (int)sizeof rest)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: " URL_ENV "='%.200s' is not a redis:// or unix:// URL "
                  "(rediss:// is not supported by the native backend: serve with --target python-onnx)", where, url);
  char* host = rest;
  char* at = strrchr(rest, '@');
  if (at != NULL) {
    *at = '\0';
    char* colon = strchr(rest, ':');
    if (colon != NULL) {
      *colon = '\0';
      snprintf(o->password, sizeof o->password, "%s", colon + 1);
    }
    snprintf(o->user, sizeof o->user, "%s", rest);
    host = at + 1;
  }
  char* slash = strchr(host, '/');
  if (slash != NULL) {
    *slash = '\0';
    if (slash[1] != '\0') o->db = atoi(slash + 1);
  }
  char* colon = strrchr(host, ':');
  if (colon != NULL) {
    *colon = '\0';
    o->port = atoi(colon + 1);
  }
  snprintf(o->host, sizeof o->host, "%s", host[0] ? host : "127.0.0.1");
  if (o->password[0] != '\0')
    snprintf(o->shown, sizeof o->shown, "redis://%s:***@%s:%d/%d", o->user, o->host, o->port, o->db);
  else
    snprintf(o->shown, sizeof o->shown, "%s", url);
  return NULL;
}

static TRITONSERVER_Error* store_settings(Online* o, const char* where) {
  TRITONSERVER_Error* err = store_url(o, where);
  if (err != NULL) return err;
  const char* timeout = getenv(TIMEOUT_ENV);
  const char* retries = getenv(RETRIES_ENV);
  char* stop = NULL;
  double seconds = 1.0;
  if (timeout != NULL && timeout[0] != '\0') {
    seconds = strtod(timeout, &stop);
    if (stop == timeout || *stop != '\0' || !(seconds > 0))
      return bad_setting(TIMEOUT_ENV, timeout, "a number of seconds > 0");
  }
  o->timeout.tv_sec = (time_t)seconds;
  o->timeout.tv_usec = (suseconds_t)((seconds - (double)o->timeout.tv_sec) * 1e6);
  o->retries = 1;
  if (retries != NULL && retries[0] != '\0') {
    o->retries = (int)strtol(retries, &stop, 10);
    if (stop == retries || *stop != '\0' || o->retries < 0) return bad_setting(RETRIES_ENV, retries, "an int >= 0");
  }
  return NULL;
}

/* A config parameter's string_value into `out` ("" when absent). */
static void config_parameter(Json config, const char* key, char* out, size_t cap) {
  Json parameters, entry;
  out[0] = '\0';
  if (json_member(config, "parameters", &parameters) && json_member(parameters, key, &entry))
    json_member_string(entry, "string_value", out, cap);
}

static TRITONSERVER_Error* bad_plan(const Version* v, const char* what) {
  return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s/" ONLINE_FILE " %s; re-export the version with "
                "treeops export --raw-inputs --target native-compiled", v->where, v->dir, what);
}

static TRITONSERVER_Error* load_fields(Online* o, const Version* v, Json plan, Json config) {
  Json fields, f, inputs, in;
  const int n = json_member(plan, "fields", &fields) ? json_array(fields, &f) : -1;
  if (n < 1 || (o->fields = calloc((size_t)n, sizeof *o->fields)) == NULL) return bad_plan(v, "lists no fields");
  o->n_fields = n;
  const int n_inputs = json_member(config, "input", &inputs) ? json_array(inputs, &in) : -1;
  if (n_inputs != n)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the model config declares %d inputs but " ONLINE_FILE
                  " %d raw fields; rewrite config.pbtxt with `treeops sync`", v->where, n_inputs, n);
  for (int i = 0; i < n; ++i, json_next(&f), json_next(&in)) {
    char kind[32] = "", name[256] = "", dtype[64] = "";
    if (!json_member_string(f, "name", o->fields[i].name, sizeof o->fields[i].name) ||
        !json_member_string(f, "kind", kind, sizeof kind) ||
        (o->fields[i].kind = name_index(FIELD_KINDS, N_FIELD_KINDS, kind)) < 0)
      return bad_plan(v, "has a field without a name or with a kind other than int64, double, string");
    json_member_string(in, "name", name, sizeof name);
    json_member_string(in, "data_type", dtype, sizeof dtype);
    if (strcmp(name, o->fields[i].name) != 0 || strcmp(dtype, FIELD_CONFIG_TYPES[o->fields[i].kind]) != 0)
      return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config input %d is '%s' %s but " ONLINE_FILE " has '%s' "
                    "%s; rewrite config.pbtxt with `treeops sync`", v->where, i, name, dtype, o->fields[i].name,
                    FIELD_CONFIG_TYPES[o->fields[i].kind]);
  }
  char name[256];
  const char* roles[3] = {"entity", "time", "transaction_id"};
  int* slots[3] = {&o->entity, &o->time, &o->txn};
  for (int r = 0; r < 3; ++r) {
    if (!json_member_string(plan, roles[r], name, sizeof name) || (*slots[r] = field_index(o, name)) < 0)
      return bad_plan(v, "names an entity, time or transaction_id that is not one of its fields");
  }
  if (o->fields[o->time].kind != FIELD_INT64 || o->fields[o->entity].kind == FIELD_DOUBLE ||
      o->fields[o->txn].kind == FIELD_DOUBLE)
    return bad_plan(v, "has a time that is not int64 or an entity/transaction_id that is a double");
  Json list, item;
  const int n_values = json_member(plan, "values", &list) ? json_array(list, &item) : -1;
  if (n_values < 0 || (o->values = calloc((size_t)n_values + 1, sizeof *o->values)) == NULL)
    return bad_plan(v, "has no \"values\" list");
  o->n_values = n_values;
  for (int k = 0; k < n_values; ++k, json_next(&item)) {
    Json at = item;
    if (!json_string(&at, name, sizeof name) || (o->values[k] = field_index(o, name)) < 0 ||
        o->fields[o->values[k]].kind != FIELD_DOUBLE)
      return bad_plan(v, "has a value column that is not a double field");
  }
  const int n_non_negative = json_member(plan, "non_negative", &list) ? json_array(list, &item) : 0;
  for (int k = 0; k < n_non_negative; ++k, json_next(&item)) {
    Json at = item;
    int fi = -1;
    if (!json_string(&at, name, sizeof name) || (fi = field_index(o, name)) < 0 || o->fields[fi].kind != FIELD_DOUBLE)
      return bad_plan(v, "has a non_negative entry that is not a double field");
    o->fields[fi].non_negative = true;
  }
  return NULL;
}

static TRITONSERVER_Error* load_vocabulary(Plan* p, const Version* v, Json feature) {
  Json list, item;
  const int n = json_member(feature, "vocabulary", &list) ? json_array(list, &item) : -1;
  if (n < 0 || (p->vocabulary = calloc((size_t)n + 1, sizeof *p->vocabulary)) == NULL)
    return bad_plan(v, "has a category feature without a vocabulary");
  for (int k = 0; k < n; ++k, json_next(&item)) {
    Json at = item;
    const size_t cap = strlen(at.p) + 1;
    char* text = malloc(cap);
    if (text == NULL || !json_string(&at, text, cap)) {
      free(text);
      return bad_plan(v, "has a vocabulary entry that is not a string");
    }
    p->vocabulary[k] = (Str){text, (uint32_t)strlen(text)};
    p->n_vocabulary = k + 1;
  }
  qsort(p->vocabulary, (size_t)n, sizeof *p->vocabulary, str_cmp_void);
  return NULL;
}

static TRITONSERVER_Error* load_plan(Online* o, const Version* v, Json plan, int64_t n_features) {
  Json features, f;
  const int n = json_member(plan, "features", &features) ? json_array(features, &f) : -1;
  if (n != n_features)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: " ONLINE_FILE " describes %d features but forest.so "
                  "has %lld; re-export the version", v->where, n, (long long)n_features);
  if ((o->plan = calloc((size_t)n, sizeof *o->plan)) == NULL)
    return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  o->n_plan = n;
  int64_t max_window = 0;
  for (int i = 0; i < n; ++i, json_next(&f)) {
    Plan* p = &o->plan[i];
    char op[32] = "", field[256] = "", aggregate[32] = "";
    if (!json_member_string(f, "op", op, sizeof op) || (p->op = name_index(OPS, N_OPS, op)) < 0)
      return bad_plan(v, "has a feature whose op the native backend does not know");
    if (p->op == OP_HISTORY) {
      int64_t column = -1;
      if (!json_member_string(f, "aggregate", aggregate, sizeof aggregate) ||
          (p->aggregate = name_index(AGGREGATES, N_AGGREGATES, aggregate)) < 0 ||
          !json_member_int(f, "window_us", &p->window_us) || p->window_us <= 0 ||
          !json_member_int(f, "column", &column) || column < 0 || column > o->n_values ||
          (column == 0 && p->aggregate != AGG_COUNT && p->aggregate != AGG_SINCE_PREV))
        return bad_plan(v, "has a history feature without a known aggregate, a window > 0 or its value column");
      p->column = (int)column;
      if (p->window_us > max_window) max_window = p->window_us;
      continue;
    }
    if (!json_member_string(f, "field", field, sizeof field) || (p->field = field_index(o, field)) < 0)
      return bad_plan(v, "has a stateless feature reading a field it does not list");
    const int want = p->op == OP_CATEGORY ? FIELD_STRING : p->op == OP_LOG1P_CLIP0 ? FIELD_DOUBLE : FIELD_INT64;
    if (o->fields[p->field].kind != want) return bad_plan(v, "has a feature whose op does not take its field's kind");
    if (p->op == OP_CATEGORY) {
      TRITONSERVER_Error* err = load_vocabulary(p, v, f);
      if (err != NULL) return err;
    }
  }
  int64_t stated = 0, retention = 0;
  if (!json_member_int(plan, "max_window_us", &stated) || stated != max_window ||
      !json_member_int(plan, "retention_us", &retention) || retention < max_window)
    return bad_plan(v, "has a max_window_us other than its longest window, or a retention shorter than it");
  snprintf(o->max_window, sizeof o->max_window, "%lld", (long long)max_window);
  snprintf(o->retention, sizeof o->retention, "%lld", (long long)retention);
  return NULL;
}

/* Read online.json and the config's online parameters; `*out` stays NULL for a feature-tensor version. */
static TRITONSERVER_Error* load_online(const Version* v, Json config, int64_t n_features, Online** out) {
  char path[4700];
  snprintf(path, sizeof path, "%s/" ONLINE_FILE, v->dir);
  if (access(path, F_OK) != 0) return NULL;
  char* text = read_text(path);
  if (text == NULL) return errorf(ERROR_NOT_FOUND, "treeops_forest: %s: cannot read %s", v->where, path);
  Online* o = *out = calloc(1, sizeof **out);
  Json plan = {text};
  TRITONSERVER_Error* err = o == NULL ? TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory") : NULL;
  int64_t format = 0;
  if (err == NULL && (!json_member_int(plan, "format", &format) || format != 1))
    err = bad_plan(v, "is not format 1");
  if (err == NULL) err = load_fields(o, v, plan, config);
  if (err == NULL) err = load_plan(o, v, plan, n_features);
  char ns[512] = "", policy[64] = "";
  if (err == NULL && (!json_member_string(plan, "namespace", ns, sizeof ns) || ns[0] == '\0' ||
                      (o->script = json_member_alloc(plan, "script")) == NULL ||
                      !json_member_string(plan, "script_sha1", o->sha, sizeof o->sha) || strlen(o->sha) != 40))
    err = bad_plan(v, "lacks its namespace, script or script_sha1");
  if (err == NULL) {
    snprintf(o->prefix, sizeof o->prefix, "%s:{", ns);
    config_parameter(config, "on_store_unavailable", policy, sizeof policy);
    if (strcmp(policy, "score_without_history") == 0) o->degrade = true;
    else if (strcmp(policy, "error") != 0)
      err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config parameter on_store_unavailable is '%s'; use "
                   "error or score_without_history", v->where, policy);
  }
  if (err == NULL) err = store_settings(o, v->where);
  free(text);
  return err;
}

/* ---- one connection per instance ---- */
typedef struct {
  redisContext* c;
  char error[512]; /* why the last call failed */
} Store;

static void store_close(Store* s) {
  if (s->c != NULL) redisFree(s->c);
  s->c = NULL;
}

static bool store_connect(const Online* o, Store* s) {
  store_close(s);
  s->c = o->socket[0] ? redisConnectUnixWithTimeout(o->socket, o->timeout)
                      : redisConnectWithTimeout(o->host, o->port, o->timeout);
  if (s->c == NULL || s->c->err) {
    snprintf(s->error, sizeof s->error, "ConnectionError: %s", s->c != NULL ? s->c->errstr : "out of memory");
    store_close(s);
    return false;
  }
  redisSetTimeout(s->c, o->timeout);
  for (int step = 0; step < 2; ++step) { /* AUTH, then SELECT, where the URL asks for them */
    redisReply* r = NULL;
    if (step == 0 && o->password[0] != '\0')
      r = o->user[0] ? redisCommand(s->c, "AUTH %s %s", o->user, o->password) : redisCommand(s->c, "AUTH %s", o->password);
    else if (step == 1 && o->db != 0)
      r = redisCommand(s->c, "SELECT %d", o->db);
    else
      continue;
    const bool failed = r == NULL || r->type == REDIS_REPLY_ERROR;
    if (failed)
      snprintf(s->error, sizeof s->error, "%s: %s", r != NULL ? "AuthenticationError" : "ConnectionError",
               r != NULL ? r->str : s->c->errstr);
    if (r != NULL) freeReplyObject(r);
    if (failed) {
      store_close(s);
      return false;
    }
  }
  return true;
}


/* ---- what a served version records: metrics and the prediction log's identity ---- */
enum { KIND_BINARY, KIND_MULTICLASS, KIND_REGRESSION };
enum { DECISION_NAME = 32 };

typedef struct {
  Forest* forest;
  Online* online;    /* the raw-transaction model (online.json), else NULL */
  const char* name;  /* Triton's, valid while the model is loaded */
  uint64_t version;
  int kind;          /* the objective's, from treeops.json: what a row's decision is */
  double threshold;
  int n_decisions;   /* binary: positive, negative; multiclass: one per class; regression: value */
  int n_history;     /* the raw-transaction model's history features: the ones it logs */
  uint64_t warmup_requests; /* Triton's model_warmup requests each instance executes first (not counted) */
  LogSettings log;
  char version_dir[4600];   /* <root>/model=<name>/version=<v> */
  char model_dir[4400];     /* <root>/model=<name>: retention runs over all its versions */
  char* header;             /* a journal segment's header (magic, format, length, CRC-32, JSON) */
  size_t header_size;
  uint64_t roll_bytes;      /* a segment is closed past this size, and retention runs */
  TRITONSERVER_MetricFamily* families[3];
  TRITONSERVER_Metric* duration;
  TRITONSERVER_Metric** decisions;
  TRITONSERVER_Metric* dropped;
} Model;

enum { FAMILY_DURATION, FAMILY_PREDICTIONS, FAMILY_DROPPED };

static void model_free(Model* m) {
  if (m == NULL) return;
  if (m->decisions != NULL)
    for (int d = 0; d < m->n_decisions; ++d)
      if (m->decisions[d] != NULL) log_error(TRITONSERVER_MetricDelete(m->decisions[d]), "deleting a metric");
  if (m->duration != NULL) log_error(TRITONSERVER_MetricDelete(m->duration), "deleting a metric");
  if (m->dropped != NULL) log_error(TRITONSERVER_MetricDelete(m->dropped), "deleting a metric");
  for (int f = 0; f < 3; ++f)
    if (m->families[f] != NULL) log_error(TRITONSERVER_MetricFamilyDelete(m->families[f]), "deleting a metric family");
  free(m->decisions);
  free(m->header);
  online_free(m->online);
  forest_free(m->forest);
  free(m);
}

static void decision_name(const Model* m, int d, char out[DECISION_NAME]) {
  if (m->kind == KIND_BINARY) snprintf(out, DECISION_NAME, "%s", d == 0 ? "positive" : "negative");
  else if (m->kind == KIND_MULTICLASS) snprintf(out, DECISION_NAME, "%d", d);
  else snprintf(out, DECISION_NAME, "value");
}

/* The decision of one scored row (`row`: its `width` outputs), as backends/serving_monitor.py counts it. */
static int decision_of(const Model* m, const float* row, int64_t width) {
  if (m->kind == KIND_BINARY) return row[width - 1] >= m->threshold ? 0 : 1;
  if (m->kind == KIND_REGRESSION) return 0;
  int best = 0;
  for (int64_t k = 1; k < width; ++k)
    if (row[k] > row[best]) best = (int)k;
  return best;
}

/* One metric of `role` in the declared metrics (config parameter TREEOPS_METRICS_PARAMETER, written by export
 * from monitoring/metric_names.py): its family is made on first use; labels are filled by name. */
static TRITONSERVER_Error* new_metric(const Model* m, const char* where, Json declared, const char* role,
                                      const char* want_kind, const char* decision,
                                      TRITONSERVER_MetricFamily** family, TRITONSERVER_Metric** metric) {
  Json d, labels, label, buckets, bucket;
  char name[256], kind[32], help[1024], label_name[64], version[32];
  if (!json_member(declared, role, &d) || !json_member_string(d, "name", name, sizeof name) ||
      !json_member_string(d, "kind", kind, sizeof kind) || !json_member_string(d, "help", help, sizeof help))
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config parameter '" TREEOPS_METRICS_PARAMETER "' lacks "
                  "role '%s' (name, kind, help): re-export the version, or `treeops sync` its config", where, role);
  if (strcmp(kind, want_kind) != 0)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: metric %s (role %s) is declared a %s; the backend "
                  "emits a %s: fix monitoring/metric_names.py", where, name, role, kind, want_kind);
  const int n_labels = json_member(d, "labels", &labels) ? json_array(labels, &label) : 0;
  if (n_labels < 0 || n_labels > 8)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: metric %s declares a bad label list", where, name);
  const TRITONSERVER_Parameter* params[8];
  TRITONSERVER_Error* err = NULL;
  int made = 0;
  snprintf(version, sizeof version, "%llu", (unsigned long long)m->version);
  for (int i = 0; i < n_labels && err == NULL; ++i, json_next(&label)) {
    Json item = label;
    const char* value = NULL;
    if (json_string(&item, label_name, sizeof label_name)) {
      if (strcmp(label_name, "model") == 0) value = m->name;
      else if (strcmp(label_name, "version") == 0) value = version;
      else if (strcmp(label_name, "decision") == 0) value = decision;
    }
    if (value == NULL) {
      err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: metric %s declares label '%s' the native backend cannot "
                   "fill (it knows model, version%s): fix monitoring/metric_names.py", where, name, label_name,
                   decision != NULL ? ", decision" : "");
      break;
    }
    params[made++] = TRITONSERVER_ParameterNew(label_name, PARAMETER_STRING, value);
  }
  double bounds[64];
  int n_bounds = 0;
  if (err == NULL && strcmp(kind, "histogram") == 0) {
    n_bounds = json_member(d, "buckets", &buckets) ? json_array(buckets, &bucket) : -1;
    if (n_bounds < 1 || n_bounds > 64)
      err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: histogram %s declares no buckets (1 to 64 bounds)",
                   where, name);
    for (int i = 0; err == NULL && i < n_bounds; ++i, json_next(&bucket))
      if (!json_double(bucket, &bounds[i]))
        err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: histogram %s has a bucket that is not a number",
                     where, name);
  }
  const int kinds = strcmp(kind, "counter") == 0 ? METRIC_COUNTER : strcmp(kind, "gauge") == 0 ? METRIC_GAUGE
                                                                                               : METRIC_HISTOGRAM;
  if (err == NULL && *family == NULL) err = TRITONSERVER_MetricFamilyNew(family, kinds, name, help);
  TRITONSERVER_MetricArgs* args = NULL;
  if (err == NULL && n_bounds > 0) {
    err = TRITONSERVER_MetricArgsNew(&args);
    if (err == NULL) err = TRITONSERVER_MetricArgsSetHistogram(args, bounds, (uint64_t)n_bounds);
  }
  if (err == NULL) err = TRITONSERVER_MetricNewWithArgs(metric, *family, params, (uint64_t)made, args);
  if (args != NULL) log_error(TRITONSERVER_MetricArgsDelete(args), "deleting metric arguments");
  for (int i = 0; i < made; ++i) TRITONSERVER_ParameterDelete((TRITONSERVER_Parameter*)params[i]);
  return err;
}

static TRITONSERVER_Error* make_metrics(Model* m, const char* where, Json config) {
  Json parameters, entry;
  if (!json_member(config, "parameters", &parameters) ||
      !json_member(parameters, TREEOPS_METRICS_PARAMETER, &entry))
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config parameter '" TREEOPS_METRICS_PARAMETER "' is "
                  "missing (exported before treeops published its serving metrics): re-export the version, or "
                  "`treeops sync` its config", where);
  Json raw = entry;
  json_ws(&raw);
  char* text = malloc(strlen(raw.p) + 1);
  if (text == NULL) return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  TRITONSERVER_Error* err = NULL;
  if (!json_member_string(entry, "string_value", text, strlen(raw.p) + 1))
    err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: config parameter '" TREEOPS_METRICS_PARAMETER "' has no "
                 "string_value; re-export the version", where);
  Json declared = {text};
  if (err == NULL)
    err = new_metric(m, where, declared, "request_duration", "histogram", NULL, &m->families[FAMILY_DURATION],
                     &m->duration);
  if (err == NULL && (m->decisions = calloc((size_t)m->n_decisions, sizeof *m->decisions)) == NULL)
    err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  for (int d = 0; err == NULL && d < m->n_decisions; ++d) {
    char decision[DECISION_NAME];
    decision_name(m, d, decision);
    err = new_metric(m, where, declared, "predictions", "counter", decision, &m->families[FAMILY_PREDICTIONS],
                     &m->decisions[d]);
  }
  if (err == NULL && m->log.root[0] != '\0')
    err = new_metric(m, where, declared, "log_dropped", "counter", NULL, &m->families[FAMILY_DROPPED], &m->dropped);
  if (err == NULL && m->online != NULL)
    err = new_metric(m, where, declared, "degraded_answers", "counter", NULL, &m->online->degraded_family,
                     &m->online->degraded);
  free(text);
  return err;
}

/* The journal header: the logged feature names (feature_spec.json, or f0..fN-1 for a forest exported without one),
 * as backends/python_model.py names the log's feature columns; a raw-transaction model logs its history features
 * (the stateless ones follow from its raw fields) and names its raw fields, as backends/online_model.py does. */
static TRITONSERVER_Error* make_header(Model* m, const Version* v) {
  char path[4700];
  snprintf(path, sizeof path, "%s/" FEATURES_FILE, v->dir);
  char* spec_text = read_text(path);
  Json spec = {spec_text}, features, feature;
  const int64_t n = m->forest->n_features;
  int listed = -1;
  if (spec_text != NULL) {
    listed = json_member(spec, "features", &features) ? json_array(features, &feature) : -1;
    if (listed != n) {
      free(spec_text);
      return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: %s lists %d features but forest.so has %lld; "
                    "re-export the version", v->where, path, listed, (long long)n);
    }
  }
  const Online* o = m->online;
  const size_t cap = 256 + 6 * strlen(m->name) + (size_t)n * (6 * 512 + 4) + 20 +
                     (o != NULL ? (size_t)o->n_fields * (6 * 256 + 40) + 12 * 256 + 64 : 0);
  const size_t prefix = 8 + 4 + 4 + 4; /* magic, format, JSON length, JSON CRC-32 */
  char* h = malloc(prefix + cap);
  TRITONSERVER_Error* err = h == NULL ? TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory") : NULL;
  size_t len = 0;
  if (err == NULL) {
    char* j = h + prefix;
    len += (size_t)sprintf(j + len, "{\"contract\":");
    len += json_quote(j + len, TREEOPS_LOG_CONTRACT);
    len += (size_t)sprintf(j + len, ",\"model\":");
    len += json_quote(j + len, m->name);
    len += (size_t)sprintf(j + len, ",\"version\":%llu,\"features\":[", (unsigned long long)m->version);
    for (int64_t i = 0; i < n && err == NULL; ++i) {
      char name[512];
      if (spec_text != NULL) {
        if (!json_member_string(feature, "name", name, sizeof name))
          err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s: feature %lld of %s has no name; re-export the "
                       "version", v->where, (long long)i, path);
        json_next(&feature);
      } else {
        snprintf(name, sizeof name, "f%lld", (long long)i);
      }
      if (err != NULL || (o != NULL && o->plan[i].op != OP_HISTORY)) continue; /* stateless: from raw.* */
      if (j[len - 1] != '[') j[len++] = ',';
      len += json_quote(j + len, name);
    }
    len += (size_t)sprintf(j + len, "]");
    if (o != NULL) { /* format 2: a raw-transaction model's records carry its raw fields */
      len += (size_t)sprintf(j + len, ",\"raw\":[");
      for (int i = 0; i < o->n_fields; ++i) {
        len += (size_t)sprintf(j + len, "%s{\"name\":", i ? "," : "");
        len += json_quote(j + len, o->fields[i].name);
        len += (size_t)sprintf(j + len, ",\"kind\":\"%s\"}", FIELD_KINDS[o->fields[i].kind]);
      }
      len += (size_t)sprintf(j + len, "],\"transaction_id\":");
      len += json_quote(j + len, o->fields[o->txn].name);
      len += (size_t)sprintf(j + len, ",\"entity\":");
      len += json_quote(j + len, o->fields[o->entity].name);
    }
    len += (size_t)sprintf(j + len, "}");
  }
  free(spec_text);
  if (err != NULL) {
    free(h);
    return err;
  }
  const uint32_t format = TREEOPS_JOURNAL_FORMAT, json_len = (uint32_t)len, crc = crc32_of(h + prefix, len);
  memcpy(h, TREEOPS_JOURNAL_MAGIC, 8);
  memcpy(h + 8, &format, 4);
  memcpy(h + 12, &json_len, 4);
  memcpy(h + 16, &crc, 4);
  m->header = h;
  m->header_size = prefix + len;
  return NULL;
}

/* The objective (what a decision is), the warm-up count, the log and the metrics of a loaded version. */
static TRITONSERVER_Error* serving_state(Model* m, const Version* v, Json metadata, Json config) {
  Json objective, warmups, w;
  char kind[32] = "binary";
  if (json_member(metadata, "objective", &objective)) {
    json_member_string(objective, "kind", kind, sizeof kind);
    Json t;
    if (json_member(objective, "threshold", &t)) json_double(t, &m->threshold);
  }
  m->kind = strcmp(kind, "multiclass") == 0 ? KIND_MULTICLASS : strcmp(kind, "regression") == 0 ? KIND_REGRESSION
                                                                                                : KIND_BINARY;
  m->n_decisions = m->kind == KIND_BINARY ? 2 : m->kind == KIND_MULTICLASS ? (int)m->forest->width : 1;
  const int n_warmups = json_member(config, "model_warmup", &warmups) ? json_array(warmups, &w) : 0;
  for (int i = 0; i < n_warmups; ++i, json_next(&w)) {
    int64_t batch = 1, count = 1;
    json_member_int(w, "batch_size", &batch);
    json_member_int(w, "count", &count);
    m->warmup_requests += (uint64_t)(batch > 0 ? batch : 1) * (uint64_t)(count > 1 ? count : 1);
  }
  for (int i = 0; m->online != NULL && i < m->online->n_plan; ++i) m->n_history += m->online->plan[i].op == OP_HISTORY;
  TRITONSERVER_Error* err = log_settings(&m->log);
  if (err == NULL && m->log.root[0] != '\0') {
    if (snprintf(m->model_dir, sizeof m->model_dir, "%s/model=%s", m->log.root, m->name) >= (int)sizeof m->model_dir)
      return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: prediction log path too long under %s", v->where,
                    m->log.root);
    snprintf(m->version_dir, sizeof m->version_dir, "%s/version=%llu", m->model_dir, (unsigned long long)m->version);
    const uint64_t quarter = (uint64_t)m->log.max_bytes / 4;
    m->roll_bytes = quarter < 4096 ? 4096 : quarter > (64u << 20) ? (64u << 20) : quarter;
    err = make_header(m, v);
  }
  if (err == NULL) err = make_metrics(m, v->where, config);
  return err;
}

/* ---- the prediction log: one append-only journal segment per instance ----
 * <root>/model=<m>/version=<v>/date=YYYY-MM-DD/hour=HH/<ns>-<pid>-<instance>.tlog, read by
 * monitoring/prediction_log.py. A segment is its header (magic, u32 format, u32 JSON length, u32 CRC-32 of the
 * JSON, JSON {"contract", "model", "version", "features"}) and then records, each framed as u32 payload length,
 * u32 CRC-32 of the payload, payload (little-endian):
 *   i64 arrival (epoch us UTC), u32 rows (or error length), u16 request id length, u8 status (0 answered,
 *   1 failed, 2 answered degraded), the request id, then for an answered request rows x f32 score (the last
 *   output column) and rows x n_features f32 features, for a failed one its error message (format 2; format 1
 *   had no status 2).
 * A raw-transaction model's header also lists its raw fields ({"name", "kind"}) and names its transaction id and
 * entity fields; its features are the history features only. Its answered records then hold, per raw field in
 * header order, rows x i64 or f64, or for text rows x u32 length and then the rows' bytes; its failed records
 * hold, after the error, u32 n and n x (u32 length, bytes): the transaction ids of a request refused after it was
 * read (store unavailable), n = 0 for one refused before.
 * Each execute call appends its records with one write(2) on an O_APPEND descriptor, before its responses are
 * sent: every answered request is in the page cache first, so kill -9 of tritonserver loses none of them; only
 * power loss can tear a tail, which the reader detects by length and CRC and skips with a warning.
 * A segment closes at its hour's end or past `roll_bytes` (max_bytes / 4, 4 KiB to 64 MiB); then retention
 * deletes the model's oldest segments (both writers') beyond max_bytes, so the log holds at most max_bytes plus
 * each instance's open segment. A segment that another instance's retention deleted while open is noticed within
 * a second (nlink 0) and replaced; what was appended to it meanwhile was deleted with it. */
enum { RECORD_FIXED = 8 + 4 + 2 + 1, FRAME = 8 };

typedef struct {
  const Model* model;
  char name[128];            /* the instance's name, as a file-name part */
  uint64_t warmup_left;      /* requests still to be skipped as warm-up */
  uint64_t rng;              /* request ids for requests without one */
  int fd;                    /* the open segment, or -1 */
  int64_t segment_hour;      /* its hour partition (epoch hours) */
  uint64_t segment_bytes;
  int64_t checked_us;        /* when the segment was last checked to be still linked */
  char segment[4700];
  bool failing;              /* the last write failed: logged once per streak */
  char* buf;                 /* this execute call's records */
  size_t size, cap;
  uint64_t records;
  uint64_t* counts;          /* rows per decision in this execute call */
  Store store;               /* the raw-transaction model's connection to the online store */
} Instance;

typedef struct {
  char* path;
  const char* name;
  int64_t size;
} SegmentFile;

static int by_name(const void* a, const void* b) {
  return strcmp(((const SegmentFile*)a)->name, ((const SegmentFile*)b)->name);
}

static bool is_segment(const char* name) {
  const size_t n = strlen(name);
  return name[0] != '.' && ((n > 5 && strcmp(name + n - 5, ".tlog") == 0) ||
                            (n > 8 && strcmp(name + n - 8, ".parquet") == 0));
}

/* The complete segments (.tlog and .parquet) under `dir`, `depth` folder levels down. */
static void collect_segments(const char* dir, int depth, SegmentFile** files, size_t* n, size_t* cap) {
  DIR* d = opendir(dir);
  if (d == NULL) return;
  struct dirent* e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char path[4700];
    if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path) continue;
    struct stat st;
    if (lstat(path, &st) != 0) continue; /* deleted meanwhile by another instance's retention */
    if (S_ISDIR(st.st_mode) && depth > 0) {
      collect_segments(path, depth - 1, files, n, cap);
    } else if (S_ISREG(st.st_mode) && depth == 0 && is_segment(e->d_name)) {
      if (*n == *cap) {
        SegmentFile* grown = realloc(*files, (*cap = *cap ? *cap * 2 : 64) * sizeof **files);
        if (grown == NULL) break;
        *files = grown;
      }
      char* copy = strdup(path);
      if (copy == NULL) break;
      (*files)[(*n)++] = (SegmentFile){copy, strrchr(copy, '/') + 1, (int64_t)st.st_size};
    }
  }
  closedir(d);
}

/* Delete the model's oldest complete segments (every version, either writer) while they hold more than
 * max_bytes; `keep` (this instance's open segment) stays. */
static void retain(const Model* m, const char* keep) {
  SegmentFile* files = NULL;
  size_t n = 0, cap = 0;
  collect_segments(m->model_dir, 3, &files, &n, &cap); /* version=V, date=D, hour=H, then the files */
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += files[i].size;
  qsort(files, n, sizeof *files, by_name);
  for (size_t i = 0; i < n && total > m->log.max_bytes; ++i) {
    if (strcmp(files[i].path, keep) == 0) continue;
    if (unlink(files[i].path) == 0 || errno == ENOENT) total -= files[i].size;
  }
  for (size_t i = 0; i < n; ++i) free(files[i].path);
  free(files);
}

static void journal_close(Instance* in) {
  if (in->fd >= 0) close(in->fd);
  in->fd = -1;
}

/* A new segment for epoch hour `hour`, header written; false with `why` set. */
static bool journal_open(Instance* in, int64_t hour, char* why, size_t why_cap) {
  const Model* m = in->model;
  const time_t start = (time_t)(hour * 3600);
  struct tm tm;
  gmtime_r(&start, &tm);
  char folder[4700];
  snprintf(folder, sizeof folder, "%s/date=%04d-%02d-%02d/hour=%02d", m->version_dir, tm.tm_year + 1900,
           tm.tm_mon + 1, tm.tm_mday, tm.tm_hour);
  if (!make_dirs(folder)) {
    snprintf(why, why_cap, "cannot create %s: %s", folder, strerror(errno));
    return false;
  }
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (snprintf(in->segment, sizeof in->segment, "%s/%020llu-%d-%s.tlog", folder,
               (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec, (int)getpid(),
               in->name) >= (int)sizeof in->segment) {
    snprintf(why, why_cap, "the segment path under %s is too long", m->version_dir);
    return false;
  }
  in->fd = open(in->segment, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
  if (in->fd < 0) {
    snprintf(why, why_cap, "cannot create %s: %s", in->segment, strerror(errno));
    return false;
  }
  if (write(in->fd, m->header, m->header_size) != (ssize_t)m->header_size) {
    snprintf(why, why_cap, "cannot write the header of %s: %s", in->segment, strerror(errno));
    journal_close(in);
    unlink(in->segment);
    return false;
  }
  in->segment_hour = hour;
  in->segment_bytes = m->header_size;
  retain(m, in->segment);
  return true;
}

/* Room for `more` bytes in this call's record buffer. */
static bool reserve(Instance* in, size_t more) {
  if (in->size + more <= in->cap) return true;
  size_t cap = in->cap ? in->cap : 4096;
  while (cap < in->size + more) cap *= 2;
  char* grown = realloc(in->buf, cap);
  if (grown == NULL) return false;
  in->buf = grown;
  in->cap = cap;
  return true;
}

/* Room in this call's buffer for a record of `body` bytes after its fixed fields and request id; returns where
 * the body goes (NULL when out of memory: the record is dropped). `record_end` frames it. */
static char* record_begin(Instance* in, const char* id, size_t id_len, int64_t arrival_us, uint32_t count,
                          uint8_t status, size_t body) {
  const size_t payload = RECORD_FIXED + id_len + body;
  if (id_len > 0xFFFF || payload > 0xFFFFFFFFu || !reserve(in, FRAME + payload)) return NULL;
  char* p = in->buf + in->size + FRAME;
  const uint16_t id_size = (uint16_t)id_len;
  memcpy(p, &arrival_us, 8);
  memcpy(p + 8, &count, 4);
  memcpy(p + 12, &id_size, 2);
  memcpy(p + 14, &status, 1);
  memcpy(p + RECORD_FIXED, id, id_len);
  return p + RECORD_FIXED + id_len;
}

static void record_end(Instance* in, const char* end) {
  char* p = in->buf + in->size + FRAME;
  const uint32_t length = (uint32_t)(end - p), crc = crc32_of(p, length);
  memcpy(in->buf + in->size, &length, 4);
  memcpy(in->buf + in->size + 4, &crc, 4);
  in->size += FRAME + length;
  in->records++;
}

static char* put_text(char* q, Str s) {
  memcpy(q, &s.n, 4);
  if (s.n > 0) memcpy(q + 4, s.p, s.n);
  return q + 4 + s.n;
}

/* Queue one request's record in this call's buffer: answered (`scores` rows x width, `x` rows x n_features)
 * or failed (`error`). False when out of memory (the record is dropped). */
static bool add_record(Instance* in, const char* id, size_t id_len, int64_t arrival_us, const char* error,
                       const float* scores, int64_t width, const float* x, int64_t rows) {
  const int64_t n_features = in->model->forest->n_features;
  const size_t error_len = error != NULL ? strlen(error) : 0;
  const size_t body = error != NULL ? error_len : (size_t)rows * (size_t)(1 + n_features) * sizeof(float);
  char* q = record_begin(in, id, id_len, arrival_us, error != NULL ? (uint32_t)error_len : (uint32_t)rows,
                         error != NULL, body);
  if (q == NULL) return false;
  if (error != NULL) {
    memcpy(q, error, error_len);
  } else {
    for (int64_t r = 0; r < rows; ++r) memcpy(q + r * (int64_t)sizeof(float), scores + r * width + width - 1, sizeof(float));
    memcpy(q + (size_t)rows * sizeof(float), x, (size_t)rows * (size_t)n_features * sizeof(float));
  }
  record_end(in, q + body);
  return true;
}

/* A raw-transaction request's record: answered (rows of the batch from `first`: score, history features, raw
 * fields; `degraded`), or failed (`error`, and the transaction ids when `raw` holds its rows, else NULL). */
static bool add_online_record(Instance* in, const char* id, size_t id_len, int64_t arrival_us, const char* error,
                              const float* scores, const float* x, const Raw* raw, int64_t first, int64_t rows,
                              bool degraded) {
  const Model* m = in->model;
  const Online* o = m->online;
  const int64_t width = m->forest->width, n_features = m->forest->n_features;
  char number[24];
  size_t body = error != NULL ? strlen(error) + 4 : (size_t)rows * (1 + (size_t)m->n_history) * sizeof(float);
  if (error != NULL && raw != NULL) {
    for (int64_t r = first; r < first + rows; ++r) body += 4 + field_text(o, raw, o->txn, r, number).n;
  } else if (error == NULL) {
    for (int i = 0; i < o->n_fields; ++i) {
      body += (size_t)rows * (o->fields[i].kind == FIELD_STRING ? 4 : 8);
      for (int64_t r = first; o->fields[i].kind == FIELD_STRING && r < first + rows; ++r)
        body += ((const Str*)raw->col[i])[r].n;
    }
  }
  const uint32_t count = error != NULL ? (uint32_t)strlen(error) : (uint32_t)rows;
  char* q = record_begin(in, id, id_len, arrival_us, count, error != NULL ? 1 : degraded ? 2 : 0, body);
  if (q == NULL) return false;
  if (error != NULL) {
    memcpy(q, error, count);
    q += count;
    const uint32_t n = raw != NULL ? (uint32_t)rows : 0;
    memcpy(q, &n, 4);
    q += 4;
    for (int64_t r = first; raw != NULL && r < first + rows; ++r) q = put_text(q, field_text(o, raw, o->txn, r, number));
    record_end(in, q);
    return true;
  }
  for (int64_t r = first; r < first + rows; ++r, q += sizeof(float))
    memcpy(q, scores + r * width + width - 1, sizeof(float));
  for (int64_t r = first; r < first + rows; ++r)
    for (int i = 0; i < o->n_plan; ++i)
      if (o->plan[i].op == OP_HISTORY) {
        memcpy(q, x + r * n_features + i, sizeof(float));
        q += sizeof(float);
      }
  for (int i = 0; i < o->n_fields; ++i) {
    if (o->fields[i].kind != FIELD_STRING) {
      memcpy(q, (const char*)raw->col[i] + first * 8, (size_t)rows * 8);
      q += (size_t)rows * 8;
      continue;
    }
    const Str* s = (const Str*)raw->col[i] + first;
    for (int64_t r = 0; r < rows; ++r, q += 4) memcpy(q, &s[r].n, 4);
    for (int64_t r = 0; r < rows; q += s[r].n, ++r)
      if (s[r].n > 0) memcpy(q, s[r].p, s[r].n);
  }
  record_end(in, q);
  return true;
}

/* Append this call's records to the instance's segment with one write(2); returns the records dropped. A
 * short write is cut off again (ftruncate), so a later record never follows a torn one. */
static uint64_t journal_flush(Instance* in, int64_t arrival_us) {
  const uint64_t records = in->records;
  const size_t size = in->size;
  in->records = 0;
  in->size = 0;
  if (records == 0) return 0;
  const Model* m = in->model;
  const int64_t hour = arrival_us / 3600000000ll;
  char why[5000] = "";
  struct stat st;
  const bool check = arrival_us - in->checked_us >= 1000000; /* once a second: another instance's retention may
                                                                have deleted this segment (nlink 0) */
  if (check) in->checked_us = arrival_us;
  if (in->fd >= 0 && (hour != in->segment_hour || in->segment_bytes >= m->roll_bytes ||
                      (check && (fstat(in->fd, &st) != 0 || st.st_nlink == 0))))
    journal_close(in);
  bool ok = in->fd >= 0 || journal_open(in, hour, why, sizeof why);
  if (ok) {
    ssize_t wrote;
    do wrote = write(in->fd, in->buf, size);
    while (wrote < 0 && errno == EINTR);
    ok = wrote == (ssize_t)size;
    if (ok) {
      in->segment_bytes += size;
    } else {
      snprintf(why, sizeof why, "writing %zu bytes to %s wrote %zd: %s", size, in->segment, wrote,
               wrote < 0 ? strerror(errno) : "short write (disk full?)");
      if (wrote > 0 && ftruncate(in->fd, (off_t)in->segment_bytes) != 0) journal_close(in);
    }
  }
  if (ok) {
    in->failing = false;
    return 0;
  }
  if (!in->failing)
    log_error(errorf(ERROR_INTERNAL, "%s; %llu prediction records dropped (counted in the log_dropped metric; "
                     "logged again after the next success)", why, (unsigned long long)records),
              "prediction log");
  in->failing = true;
  return records;
}

/* The model config as NUL-terminated JSON (caller frees). */
static TRITONSERVER_Error* config_text(TRITONBACKEND_Model* model, char** text) {
  TRITONSERVER_Message* message = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelConfig(model, 1, &message);
  if (err != NULL) return err;
  const char* base = NULL;
  size_t size = 0;
  if ((err = TRITONSERVER_MessageSerializeToJson(message, &base, &size)) == NULL) {
    if ((*text = malloc(size + 1)) == NULL) {
      err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
    } else {
      memcpy(*text, base, size);
      (*text)[size] = '\0';
    }
  }
  log_error(TRITONSERVER_MessageDelete(message), "deleting the model config message");
  return err;
}

/* The raw-transaction model's config outputs: the scores FP32 [width] named as treeops.json records, and
 * treeops_degraded BOOL [1]. */
static TRITONSERVER_Error* check_online_outputs(const Version* v, Json config, Json metadata, const Forest* forest) {
  char want[512] = "";
  json_member_string(metadata, "output_name", want, sizeof want);
  Json outputs, t;
  const int n = json_member(config, "output", &outputs) ? json_array(outputs, &t) : -1;
  bool scores = false, flags = false;
  for (int i = 0; i < n; ++i, json_next(&t)) {
    char name[512] = "", dtype[64] = "";
    Json dims, d;
    int64_t dim = 0;
    json_member_string(t, "name", name, sizeof name);
    json_member_string(t, "data_type", dtype, sizeof dtype);
    const bool one = json_member(t, "dims", &dims) && json_array(dims, &d) == 1 && json_int(d, &dim);
    scores |= strcmp(name, want) == 0 && strcmp(dtype, "TYPE_FP32") == 0 && one && dim == forest->width;
    flags |= strcmp(name, DEGRADED_OUTPUT) == 0 && strcmp(dtype, "TYPE_BOOL") == 0 && one && dim == 1;
  }
  if (n != 2 || !scores || !flags)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: %s: the raw-transaction model's config must declare exactly "
                  "the outputs '%s' TYPE_FP32 [%lld] and '" DEGRADED_OUTPUT "' TYPE_BOOL [1]; rewrite config.pbtxt "
                  "with `treeops sync`", v->where, want, (long long)forest->width);
  return NULL;
}

/* Check the version's files, load its forest, check the config against it and set up what it records;
 * `*out` is set first, so that the caller frees whatever was loaded when a later step fails. */
static TRITONSERVER_Error* load_version(TRITONBACKEND_Model* model, Model** out) {
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
  char* text = NULL;
  Model* m = *out = calloc(1, sizeof **out);
  if (m == NULL || (m->forest = calloc(1, sizeof *m->forest)) == NULL)
    err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  if (err == NULL) {
    m->name = v.model;
    m->version = version;
    m->threshold = 0.5;
    err = verify_files(&v, metadata); /* before anything of the version is mapped */
  }
  if (err == NULL) err = open_forest(&v, m->forest);
  if (err == NULL) err = config_text(model, &text);
  if (err == NULL) err = load_online(&v, (Json){text}, m->forest->n_features, &m->online);
  if (err == NULL && m->online == NULL) err = check_config(&v, (Json){text}, metadata, m->forest);
  if (err == NULL && m->online != NULL) err = check_online_outputs(&v, (Json){text}, metadata, m->forest);
  if (err == NULL) err = serving_state(m, &v, metadata, (Json){text});
  free(text);
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
  crc32_init();
  return NULL;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  Model* m = NULL;
  TRITONSERVER_Error* err = load_version(model, &m);
  if (err == NULL) err = TRITONBACKEND_ModelSetState(model, m);
  if (err != NULL) model_free(m); /* Triton never calls ModelFinalize for a model that failed here */
  return err;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelState(model, &state);
  if (err != NULL) return err;
  model_free(state);
  return NULL;
}

static void instance_free(Instance* in) {
  if (in == NULL) return;
  journal_close(in); /* every record was written by its execute call: nothing is left to flush */
  store_close(&in->store);
  free(in->buf);
  free(in->counts);
  free(in);
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model = NULL;
  void* state = NULL;
  const char* name = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
  if (err == NULL) err = TRITONBACKEND_ModelState(model, &state);
  if (err == NULL) err = TRITONBACKEND_ModelInstanceName(instance, &name);
  if (err != NULL) return err;
  const Model* m = state;
  Instance* in = calloc(1, sizeof *in);
  if (in == NULL || (in->counts = calloc((size_t)m->n_decisions, sizeof *in->counts)) == NULL) {
    instance_free(in);
    return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  }
  in->model = m;
  in->fd = -1;
  in->warmup_left = m->warmup_requests;
  size_t k = 0;
  for (const char* p = name; *p && k + 1 < sizeof in->name; ++p)
    in->name[k++] = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ? *p : '_';
  in->name[k] = '\0';
  if (getrandom(&in->rng, sizeof in->rng, 0) != (ssize_t)sizeof in->rng) in->rng = now_ns();
  in->rng |= 1;
  err = TRITONBACKEND_ModelInstanceSetState(instance, in);
  if (err != NULL) instance_free(in);
  return err;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance* instance) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
  if (err != NULL) return err;
  instance_free(state);
  return NULL;
}

/* ---- execution ---- */
typedef struct {
  TRITONBACKEND_Input* input;
  uint32_t buffer_count;
  int64_t rows;
  int64_t first_row;          /* in the batch */
  TRITONSERVER_Error* error;  /* the request fails with it (answered after the log is written) */
  bool ok;                    /* answered with its scores */
  bool gathered;              /* a raw-transaction request whose raw fields were read (its rows in the Raw) */
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

/* ---- one batch of raw transactions ---- */
/* The request parameter treeops_read_only (bool, or the string true/false; absent: false). */
static TRITONSERVER_Error* read_only(TRITONBACKEND_Request* request, bool* out) {
  uint32_t n = 0;
  *out = false;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestParameterCount(request, &n);
  for (uint32_t k = 0; k < n && err == NULL; ++k) {
    const char* key = NULL;
    int type = 0;
    const void* value = NULL;
    if ((err = TRITONBACKEND_RequestParameter(request, k, &key, &type, &value)) != NULL) break;
    if (strcmp(key, READ_ONLY_PARAMETER) != 0) continue;
    if (type == PARAMETER_BOOL) *out = *(const bool*)value;
    else if (type == PARAMETER_STRING && strcasecmp(value, "true") == 0) *out = true;
    else if (!(type == PARAMETER_STRING && strcasecmp(value, "false") == 0))
      return errorf(ERROR_INVALID_ARG, "request parameter '" READ_ONLY_PARAMETER "' is %s; send true or false",
                    type == PARAMETER_STRING ? (const char*)value : "not a bool");
  }
  return err;
}

/* Check one request's inputs (each field present, its datatype, the same rows in all); sets part->rows. */
static TRITONSERVER_Error* raw_request_input(const Online* o, TRITONBACKEND_Request* request, Part* part,
                                             TRITONBACKEND_Input** inputs, uint32_t* buffers) {
  int64_t rows = -1;
  for (int i = 0; i < o->n_fields; ++i) {
    const Field* f = &o->fields[i];
    const char* name = NULL;
    int datatype = 0;
    const int64_t* shape = NULL;
    uint32_t dims = 0;
    uint64_t bytes = 0;
    if (TRITONBACKEND_RequestInput(request, f->name, &inputs[i]) != NULL) {
      char listed[2048] = "";
      for (int k = 0; k < o->n_fields; ++k)
        snprintf(listed + strlen(listed), sizeof listed - strlen(listed), "%s'%s'", k ? ", " : "", o->fields[k].name);
      return errorf(ERROR_INVALID_ARG, "input '%s' is missing; the model takes [%s]", f->name, listed);
    }
    TRITONSERVER_Error* err = TRITONBACKEND_InputProperties(inputs[i], &name, &datatype, &shape, &dims, &bytes,
                                                            &buffers[i]);
    if (err != NULL) return err;
    if (datatype != FIELD_DATATYPES[f->kind])
      return errorf(ERROR_INVALID_ARG, "input '%s' must be %s", f->name, f->kind == FIELD_STRING ? "BYTES"
                    : f->kind == FIELD_INT64 ? "INT64" : "FP64");
    int64_t n = dims > 0 ? shape[0] : 1;
    for (uint32_t d = 1; d < dims; ++d) n *= shape[d];
    if (dims < 1 || dims > 2 || (dims == 2 && shape[1] != 1) || n < 1)
      return errorf(ERROR_INVALID_ARG, "input '%s' must be [rows >= 1, 1]", f->name);
    if (f->kind != FIELD_STRING && bytes != (uint64_t)n * 8u)
      return errorf(ERROR_INVALID_ARG, "input '%s' holds %llu bytes, not the %lld values of its shape", f->name,
                    (unsigned long long)bytes, (long long)n);
    if (rows >= 0 && n != rows)
      return errorf(ERROR_INVALID_ARG, "input '%s' has %lld rows, the others %lld; send one row per transaction in "
                    "every input", f->name, (long long)n, (long long)rows);
    rows = n;
  }
  part->rows = rows;
  return NULL;
}

/* The bytes of one input: its lone CPU buffer where it lies, else a copy kept in `raw`. */
static TRITONSERVER_Error* input_bytes(TRITONBACKEND_Input* input, uint32_t buffers, Raw* raw, const char** out,
                                       uint64_t* size) {
  const void* piece = NULL;
  uint64_t piece_size = 0, total = 0;
  int memory_type = MEMORY_CPU;
  int64_t memory_id = 0;
  char* copy = NULL;
  for (uint32_t b = 0; b < buffers; ++b) {
    TRITONSERVER_Error* err = TRITONBACKEND_InputBuffer(input, b, &piece, &piece_size, &memory_type, &memory_id);
    if (err == NULL && memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED)
      err = TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest reads CPU tensors only (instance kind CPU)");
    if (err != NULL) {
      free(copy);
      return err;
    }
    if (buffers == 1) {
      *out = piece;
      *size = piece_size;
      return NULL;
    }
    char* grown = realloc(copy, total + piece_size + 1);
    if (grown == NULL) {
      free(copy);
      return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
    }
    copy = grown;
    memcpy(copy + total, piece, piece_size);
    total += piece_size;
  }
  raw->copies[raw->n_copies++] = copy;
  *out = copy;
  *size = total;
  return NULL;
}

/* Whether `s` is UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), as Python decodes it. */
static bool utf8(const unsigned char* s, uint32_t n) {
  for (uint32_t i = 0; i < n;) {
    const unsigned char c = s[i];
    uint32_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > n || (len == 2 && c < 0xC2)) return false;
    for (uint32_t k = 1; k < len; ++k)
      if ((s[i + k] & 0xC0) != 0x80) return false;
    if (len == 3 && ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] >= 0xA0))) return false;
    if (len == 4 && ((c == 0xF0 && s[i + 1] < 0x90) || c > 0xF4 || (c == 0xF4 && s[i + 1] >= 0x90))) return false;
    i += len;
  }
  return true;
}

/* Copy one request's fields into the batch columns and check them; the first problem fails the request. */
static TRITONSERVER_Error* raw_gather(const Online* o, Part* part, TRITONBACKEND_Input** inputs,
                                      const uint32_t* buffers, Raw* raw) {
  const int64_t a = part->first_row, rows = part->rows;
  for (int i = 0; i < o->n_fields; ++i) {
    const Field* f = &o->fields[i];
    const char* bytes = NULL;
    uint64_t size = 0;
    TRITONSERVER_Error* err = input_bytes(inputs[i], buffers[i], raw, &bytes, &size);
    if (err != NULL) return err;
    if (f->kind != FIELD_STRING) {
      memcpy((char*)raw->col[i] + a * 8, bytes, (size_t)rows * 8);
      continue;
    }
    Str* s = (Str*)raw->col[i] + a;
    uint64_t at = 0;
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t n = 0;
      if (at + 4 > size || (memcpy(&n, bytes + at, 4), at + 4 + n > size))
        return errorf(ERROR_INVALID_ARG, "input '%s' row %lld: the BYTES tensor ends inside its element", f->name,
                      (long long)r);
      s[r] = (Str){bytes + at + 4, n};
      at += 4 + (uint64_t)n;
    }
  }
  for (int i = 0; i < o->n_fields; ++i) {
    const Str* s = (const Str*)raw->col[i] + a;
    for (int64_t r = 0; o->fields[i].kind == FIELD_STRING && r < rows; ++r)
      if (!utf8((const unsigned char*)s[r].p, s[r].n))
        return errorf(ERROR_INVALID_ARG, "input '%s' row %lld: not UTF-8 text", o->fields[i].name, (long long)r);
  }
  for (int i = 0; i < o->n_fields; ++i) {
    const double* d = (const double*)raw->col[i] + a;
    for (int64_t r = 0; o->fields[i].non_negative && r < rows; ++r)
      if (!(d[r] >= 0) || !isfinite(d[r]))
        return errorf(ERROR_INVALID_ARG, "input '%s' row %lld: %.17g is not a finite number >= 0", o->fields[i].name,
                      (long long)r, d[r]);
  }
  const int64_t* t = (const int64_t*)raw->col[o->time] + a;
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] < MIN_TIME_US || t[r] >= MAX_TIME_US)
      return errorf(ERROR_INVALID_ARG, "input '%s' row %lld: %lld is outside 1990-01-01..2200-01-01 UTC; send epoch "
                    "microseconds (seconds * 1_000_000)", o->fields[o->time].name, (long long)r, (long long)t[r]);
  return NULL;
}

/* field_text kept in the batch's tokens (slot 0 or 1 of row `r`) until the batch's store calls are sent. */
static Str token(const Online* o, const Raw* raw, int field, int64_t r, int slot) {
  return field_text(o, raw, field, r, raw->tokens + (r * 2 + slot) * 24);
}

typedef struct {
  const Online* o;
  const Raw* raw;
} OrderContext;
static __thread OrderContext order_context; /* qsort has no context argument in C11 */

static int by_time_then_row(const void* pa, const void* pb) {
  const int64_t a = *(const int64_t*)pa, b = *(const int64_t*)pb;
  const int64_t* t = order_context.raw->col[order_context.o->time];
  return t[a] != t[b] ? (t[a] > t[b]) - (t[a] < t[b]) : (a > b) - (a < b);
}

/* Append one script call for rows order[from, to) to the connection's output buffer. */
static bool append_call(const Online* o, Store* s, const Raw* raw, const int64_t* order, int64_t from, int64_t to) {
  const int64_t n = to - from;
  const int width = 1 + o->n_values;
  const size_t prefix = strlen(o->prefix);
  Str* entities = malloc((size_t)n * sizeof *entities);
  int* number = malloc((size_t)n * sizeof *number);
  double* data = malloc((size_t)n * (size_t)width * sizeof *data + 1);
  char* flags = malloc((size_t)n + 1);
  char* numbers = malloc((size_t)n * 12 + 1);
  const int argc_max = (int)(7 + 5 * n);
  const char** argv = malloc((size_t)argc_max * sizeof *argv);
  size_t* lens = malloc((size_t)argc_max * sizeof *lens);
  char* keys = NULL;
  bool ok = entities && number && data && flags && numbers && argv && lens;
  int distinct = 0;
  size_t key_bytes = 0;
  for (int64_t j = 0; ok && j < n; ++j) {
    const int64_t r = order[from + j];
    const Str e = token(o, raw, o->entity, r, 0);
    int k = 0;
    while (k < distinct && str_cmp(&entities[k], &e) != 0) ++k;
    if (k == distinct) {
      entities[distinct++] = e;
      key_bytes += 3 * (prefix + e.n + 3);
    }
    number[j] = k + 1;
    data[j * width] = (double)((const int64_t*)raw->col[o->time])[r];
    for (int c = 0; c < o->n_values; ++c) data[j * width + 1 + c] = ((const double*)raw->col[o->values[c]])[r];
    flags[j] = raw->update[r] ? '1' : '0';
  }
  if (ok && (keys = malloc(key_bytes + 1)) == NULL) ok = false;
  int argc = 0;
  char numkeys[16];
  if (ok) {
    snprintf(numkeys, sizeof numkeys, "%d", 3 * distinct);
    argv[argc] = "EVALSHA", lens[argc++] = 7;
    argv[argc] = o->sha, lens[argc++] = 40;
    argv[argc] = numkeys, lens[argc++] = strlen(numkeys);
    char* at = keys;
    for (int k = 0; k < distinct; ++k) {
      for (const char* suffix = "zth"; *suffix; ++suffix) {
        memcpy(at, o->prefix, prefix);
        memcpy(at + prefix, entities[k].p, entities[k].n);
        memcpy(at + prefix + entities[k].n, "}:", 2);
        at[prefix + entities[k].n + 2] = *suffix;
        argv[argc] = at, lens[argc++] = prefix + entities[k].n + 3;
        at += prefix + entities[k].n + 3;
      }
    }
    argv[argc] = o->max_window, lens[argc++] = strlen(o->max_window);
    argv[argc] = o->retention, lens[argc++] = strlen(o->retention);
    argv[argc] = (const char*)data, lens[argc++] = (size_t)n * (size_t)width * sizeof *data;
    argv[argc] = flags, lens[argc++] = (size_t)n;
    for (int64_t j = 0; j < n; ++j) {
      char* text = numbers + j * 12;
      argv[argc] = text, lens[argc++] = (size_t)snprintf(text, 12, "%d", number[j]);
      const Str txn = token(o, raw, o->txn, order[from + j], 1);
      argv[argc] = txn.p, lens[argc++] = txn.n;
    }
    ok = redisAppendCommandArgv(s->c, argc, argv, lens) == REDIS_OK;
    if (!ok) snprintf(s->error, sizeof s->error, "ConnectionError: %s", s->c->errstr);
  } else {
    snprintf(s->error, sizeof s->error, "MemoryError: out of memory building a script call of %lld rows", (long long)n);
  }
  free(entities);
  free(number);
  free(data);
  free(flags);
  free(numbers);
  free(argv);
  free(lens);
  free(keys);
  return ok;
}

/* Send every call, read every reply (NULL where none came); on a dropped connection `*dropped` is set. */
static bool exchange(const Online* o, Store* s, const Raw* raw, const int64_t* order, int64_t n, redisReply** replies,
                     int64_t calls, bool* dropped) {
  *dropped = false;
  for (int64_t c = 0; c < calls; ++c)
    if (!append_call(o, s, raw, order, c * SCRIPT_ROWS, (c + 1) * SCRIPT_ROWS < n ? (c + 1) * SCRIPT_ROWS : n))
      return false;
  for (int64_t c = 0; c < calls; ++c) {
    void* reply = NULL;
    if (redisGetReply(s->c, &reply) != REDIS_OK) {
      const bool timeout = s->c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK);
      snprintf(s->error, sizeof s->error, "%s: %s", timeout ? "TimeoutError" : "ConnectionError",
               timeout ? "Timeout reading from the store" : s->c->errstr);
      *dropped = !timeout;
      return false;
    }
    replies[c] = reply;
  }
  return true;
}

static void free_replies(redisReply** replies, int64_t calls) {
  for (int64_t c = 0; c < calls; ++c) {
    if (replies[c] != NULL) freeReplyObject(replies[c]);
    replies[c] = NULL;
  }
}

/* All calls in one pipelined round trip; reconnects on a dropped connection (up to `retries` times), loads the
 * script on NOSCRIPT and repeats once (safe: a transaction id already stored changes nothing). */
static bool store_calls(const Online* o, Store* s, const Raw* raw, const int64_t* order, int64_t n,
                        redisReply** replies, int64_t calls) {
  int reconnects = 0;
  bool loaded = false;
  for (;;) {
    bool dropped = false;
    if (s->c == NULL && !store_connect(o, s)) {
      if (reconnects++ < o->retries) continue;
      return false;
    }
    if (!exchange(o, s, raw, order, n, replies, calls, &dropped)) {
      free_replies(replies, calls);
      store_close(s); /* the pipeline's state is unknown */
      if (dropped && reconnects++ < o->retries) continue;
      return false;
    }
    bool noscript = false;
    for (int64_t c = 0; c < calls; ++c)
      if (replies[c]->type == REDIS_REPLY_ERROR) {
        noscript |= strncmp(replies[c]->str, "NOSCRIPT", 8) == 0;
        if (!noscript) {
          snprintf(s->error, sizeof s->error, "ResponseError: %s", replies[c]->str);
          free_replies(replies, calls);
          return false;
        }
      }
    if (!noscript) return true;
    free_replies(replies, calls);
    redisReply* r = loaded ? NULL : redisCommand(s->c, "SCRIPT LOAD %s", o->script);
    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
      snprintf(s->error, sizeof s->error, "ResponseError: loading the history script: %s",
               r != NULL ? r->str : loaded ? "NOSCRIPT after SCRIPT LOAD" : s->c->errstr);
      if (r != NULL) freeReplyObject(r);
      store_close(s);
      return false;
    }
    freeReplyObject(r);
    loaded = true;
  }
}

/* First of `n` members (each `stride` doubles, time first, sorted by time) with time >= t. */
static int64_t first_at(const double* m, int64_t n, int stride, double t) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (m[mid * stride] < t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

static int by_pair(const void* pa, const void* pb) {
  const double* a = pa;
  const double* b = pb;
  return a[0] != b[0] ? (a[0] > b[0]) - (a[0] < b[0]) : (a[1] > b[1]) - (a[1] < b[1]);
}

/* Column `col` of members [start, n) added left to right in (time, value) order (online_history._sum). */
static double window_sum(const double* m, int64_t start, int64_t n, int stride, int col, double* pairs) {
  bool ties = false;
  for (int64_t k = start + 1; k < n && !ties; ++k) ties = m[k * stride] == m[(k - 1) * stride];
  double total = 0.0;
  if (!ties) {
    total = m[start * stride + col];
    for (int64_t k = start + 1; k < n; ++k) total += m[k * stride + col];
    return total;
  }
  for (int64_t k = start; k < n; ++k) {
    pairs[(k - start) * 2] = m[k * stride];
    pairs[(k - start) * 2 + 1] = m[k * stride + col];
  }
  qsort(pairs, (size_t)(n - start), 2 * sizeof *pairs, by_pair);
  total = pairs[1];
  for (int64_t k = 1; k < n - start; ++k) total += pairs[k * 2 + 1];
  return total;
}

/* One row's history features into `x` (its forest row) from its head (seen, member, window size) and its window's
 * members: OnlineHistory._aggregate and _row. `scratch` holds at least n * (stride + 2) doubles. */
static void history_row(const Online* o, const double* head, const double* members, float* x, double* scratch) {
  const int stride = 2 + o->n_values; /* time, values, seq */
  const double* own = head + 1;
  int64_t n = (int64_t)head[1 + stride];
  const double* m = members;
  if (head[0] != 0.0) { /* a retry: its history as at its first arrival (members stored before it) */
    int64_t kept = 0;
    for (int64_t k = 0; k < n; ++k)
      if (members[k * stride + stride - 1] < own[stride - 1])
        memcpy(scratch + kept++ * stride, members + k * stride, (size_t)stride * sizeof *scratch);
    m = scratch;
    n = kept;
  }
  double* pairs = scratch + n * stride;
  const double t = own[0];
  for (int i = 0; i < o->n_plan; ++i) {
    const Plan* p = &o->plan[i];
    if (p->op != OP_HISTORY) continue;
    const int64_t start = first_at(m, n, stride, t - (double)p->window_us), count = n - start;
    double value;
    if (p->aggregate == AGG_COUNT) {
      value = (double)count;
    } else if (p->aggregate == AGG_SINCE_PREV) {
      value = count ? (t - m[(n - 1) * stride]) / 1e6 : NAN;
    } else {
      const double total = count ? window_sum(m, start, n, stride, p->column, pairs) : 0.0;
      if (p->aggregate == AGG_SUM) value = total;
      else if (p->aggregate == AGG_MEAN) value = count ? total / (double)count : NAN;
      else {
        const double mean = count ? total / (double)count : 0.0;
        value = mean != 0.0 ? own[p->column] / mean : NAN;
      }
    }
    x[i] = (float)value;
  }
}

/* The script's replies for rows `order` into the batch rows of `x`; false (s->error says why) on a malformed one. */
static bool read_history(const Online* o, Store* s, redisReply** replies, int64_t calls, const int64_t* order,
                         int64_t n, float* x, int64_t n_features) {
  const int stride = 2 + o->n_values, head_size = stride + 2;
  int64_t max_members = 0;
  for (int64_t c = 0; c < calls; ++c) {
    const redisReply* r = replies[c];
    const int64_t rows = (c + 1) * SCRIPT_ROWS < n ? SCRIPT_ROWS : n - c * SCRIPT_ROWS;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
        r->element[1]->type != REDIS_REPLY_STRING || r->element[0]->len != (size_t)(rows * head_size * 8) ||
        r->element[1]->len % (size_t)(stride * 8) != 0) {
      snprintf(s->error, sizeof s->error, "ResponseError: the history script answered in an unexpected form "
               "(another treeops version's script under the same SHA-1?)");
      return false;
    }
    const int64_t members = (int64_t)(r->element[1]->len / (size_t)(stride * 8));
    if (members > max_members) max_members = members;
  }
  double* scratch = malloc((size_t)(max_members * (stride + 2) + 1) * sizeof *scratch);
  double* head = malloc((size_t)head_size * sizeof *head);
  double* window = NULL;
  size_t window_cap = 0;
  bool ok = scratch != NULL && head != NULL;
  for (int64_t c = 0; ok && c < calls; ++c) {
    const redisReply* r = replies[c];
    const int64_t rows = (c + 1) * SCRIPT_ROWS < n ? SCRIPT_ROWS : n - c * SCRIPT_ROWS;
    size_t at = 0;
    for (int64_t j = 0; ok && j < rows; ++j) {
      memcpy(head, r->element[0]->str + (size_t)j * (size_t)head_size * 8, (size_t)head_size * 8);
      const int64_t members = (int64_t)head[head_size - 1];
      const size_t bytes = (size_t)members * (size_t)stride * 8;
      if (members < 0 || at + bytes > r->element[1]->len) {
        snprintf(s->error, sizeof s->error, "ResponseError: the history script's reply is shorter than its heads say");
        ok = false;
        break;
      }
      if (bytes + 8 > window_cap) { /* an aligned copy: the reply's bytes have no alignment */
        double* grown = realloc(window, bytes + 8);
        if (grown == NULL) {
          ok = false;
          break;
        }
        window = grown;
        window_cap = bytes + 8;
      }
      memcpy(window, r->element[1]->str + at, bytes);
      at += bytes;
      history_row(o, head, window, x + order[c * SCRIPT_ROWS + j] * n_features, scratch);
    }
  }
  if (!ok && s->error[0] == '\0') snprintf(s->error, sizeof s->error, "MemoryError: out of memory");
  free(scratch);
  free(head);
  free(window);
  return ok;
}

/* The stateless features of row `r` into `x` (its forest row). */
static void stateless_row(const Online* o, const Raw* raw, int64_t r, float* x) {
  for (int i = 0; i < o->n_plan; ++i) {
    const Plan* p = &o->plan[i];
    if (p->op == OP_HISTORY) continue;
    if (p->op == OP_LOG1P_CLIP0) {
      const double a = ((const double*)raw->col[p->field])[r];
      x[i] = (float)log1p(a < 0 ? 0.0 : a); /* Polars clip(lower_bound=0).log1p(): NaN stays NaN */
    } else if (p->op == OP_CATEGORY) {
      const Str* hit = bsearch(&((const Str*)raw->col[p->field])[r], p->vocabulary, (size_t)p->n_vocabulary,
                               sizeof *p->vocabulary, str_cmp_void);
      x[i] = hit != NULL ? (float)(hit - p->vocabulary) : NAN;
    } else {
      const int64_t t = ((const int64_t*)raw->col[p->field])[r];
      const int64_t us_of_day = ((t % US_PER_DAY) + US_PER_DAY) % US_PER_DAY;
      const int64_t weekday = (((t - us_of_day) / US_PER_DAY + 3) % 7 + 7) % 7 + 1; /* 1970-01-01: a Thursday */
      x[i] = p->op == OP_HOUR_OF_DAY ? (float)(us_of_day / US_PER_HOUR)
             : p->op == OP_ISO_WEEKDAY ? (float)weekday : (float)(weekday >= 6);
    }
  }
}

/* A refused request's error, naming the model and saying the store was not touched (as online_model.py says). */
static TRITONSERVER_Error* refusal(const Model* m, TRITONSERVER_Error* err) {
  TRITONSERVER_Error* out = errorf(TRITONSERVER_ErrorCode(err), "model '%s' version %llu: %s; nothing was written to "
                                   "the online store", m->name, (unsigned long long)m->version,
                                   TRITONSERVER_ErrorMessage(err));
  TRITONSERVER_ErrorDelete(err);
  return out;
}

/* The forest rows of a batch of raw-transaction requests: each request checked and gathered into `raw` (the
 * caller frees it; a refused one gets its error in its part and its rows stay zeros), then one store round trip
 * for the rows of the others, then their features. `*degraded`: scored without history (store down, policy
 * score_without_history). NULL: out of memory. */
static float* online_batch(Instance* in, TRITONBACKEND_Request** requests, uint32_t count, Part* parts, Raw* raw,
                           int64_t* batch_rows, bool* degraded) {
  const Model* m = in->model;
  const Online* o = m->online;
  const int64_t n_features = m->forest->n_features;
  TRITONBACKEND_Input** inputs = calloc((size_t)count * (size_t)o->n_fields + 1, sizeof *inputs);
  uint32_t* buffers = calloc((size_t)count * (size_t)o->n_fields + 1, sizeof *buffers);
  bool* flags = calloc((size_t)count + 1, sizeof *flags);
  *batch_rows = 0;
  *degraded = false;
  for (uint32_t r = 0; inputs && buffers && flags && r < count; ++r) {
    parts[r].error = raw_request_input(o, requests[r], &parts[r], inputs + (size_t)r * o->n_fields,
                                       buffers + (size_t)r * o->n_fields);
    if (parts[r].error == NULL) parts[r].error = read_only(requests[r], &flags[r]);
    if (parts[r].error != NULL) {
      parts[r].error = refusal(m, parts[r].error);
      continue;
    }
    parts[r].first_row = *batch_rows;
    *batch_rows += parts[r].rows;
  }
  const int64_t rows = *batch_rows;
  bool ok = inputs && buffers && flags && (raw->col = calloc((size_t)o->n_fields, sizeof *raw->col)) != NULL &&
            (raw->copies = calloc((size_t)count * (size_t)o->n_fields + 1, sizeof *raw->copies)) != NULL &&
            (raw->update = calloc((size_t)rows + 1, sizeof *raw->update)) != NULL &&
            (raw->tokens = malloc((size_t)rows * 48 + 1)) != NULL;
  for (int i = 0; ok && i < o->n_fields; ++i)
    ok = (raw->col[i] = calloc((size_t)rows + 1, o->fields[i].kind == FIELD_STRING ? sizeof(Str) : 8)) != NULL;
  float* x = ok ? calloc((size_t)rows * (size_t)n_features + 1, sizeof *x) : NULL;
  int64_t* order = x != NULL ? malloc((size_t)rows * sizeof *order + 1) : NULL;
  int64_t n = 0;
  for (uint32_t r = 0; order != NULL && r < count; ++r) {
    if (parts[r].error != NULL) continue;
    TRITONSERVER_Error* err = raw_gather(o, &parts[r], inputs + (size_t)r * o->n_fields,
                                         buffers + (size_t)r * o->n_fields, raw);
    if (err != NULL) {
      parts[r].error = refusal(m, err);
      continue;
    }
    parts[r].gathered = true;
    for (int64_t k = 0; k < parts[r].rows; ++k) {
      raw->update[parts[r].first_row + k] = !flags[r];
      order[n++] = parts[r].first_row + k;
    }
  }
  if (order != NULL && n > 0) {
    order_context = (OrderContext){o, raw};
    qsort(order, (size_t)n, sizeof *order, by_time_then_row); /* rows of one entity apply in (time, row) order */
    const int64_t calls = (n + SCRIPT_ROWS - 1) / SCRIPT_ROWS;
    redisReply** replies = calloc((size_t)calls, sizeof *replies);
    in->store.error[0] = '\0';
    bool answered = replies != NULL && store_calls(o, &in->store, raw, order, n, replies, calls) &&
                    read_history(o, &in->store, replies, calls, order, n, x, n_features);
    if (replies != NULL) free_replies(replies, calls);
    free(replies);
    if (!answered && o->degrade) {
      *degraded = true;
      for (int64_t j = 0; j < n; ++j)
        for (int i = 0; i < o->n_plan; ++i)
          if (o->plan[i].op == OP_HISTORY) x[order[j] * n_features + i] = NAN;
    } else if (!answered) {
      for (uint32_t r = 0; r < count; ++r)
        if (parts[r].error == NULL)
          parts[r].error = errorf(ERROR_UNAVAILABLE, "model '%s' version %llu: online store %s is unavailable (%s): "
                                  "start Redis there or set " URL_ENV " to a running one; retry later (a retried "
                                  "transaction_id is counted once), or export with --on-store-unavailable "
                                  "score_without_history", m->name, (unsigned long long)m->version, o->shown,
                                  in->store.error[0] ? in->store.error : "MemoryError: out of memory");
    }
    for (int64_t j = 0; j < n; ++j) stateless_row(o, raw, order[j], x + order[j] * n_features);
  }
  free(order);
  free(inputs);
  free(buffers);
  free(flags);
  return x;
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

/* Write `rows` x `width` scores into every output `request` asks for (the raw-transaction model's
 * treeops_degraded: `degraded` in each of its rows, BOOL [rows, 1]), and send its response. */
static bool respond(TRITONBACKEND_Request* request, const float* scores, int64_t rows, int64_t width, bool online,
                    bool degraded) {
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
    const bool flag = online && strcmp(name, DEGRADED_OUTPUT) == 0;
    const int64_t flag_shape[2] = {rows, 1};
    if ((err = TRITONBACKEND_ResponseOutput(response, &output, name, flag ? TYPE_BOOL : TYPE_FP32,
                                            flag ? flag_shape : shape, 2)))
      break;
    if ((err = TRITONBACKEND_OutputBuffer(output, &out, flag ? (uint64_t)rows : bytes, &memory_type, &memory_id))) break;
    if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED) {
      err = TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest writes CPU tensors only");
      break;
    }
    if (flag) memset(out, degraded ? 1 : 0, (size_t)rows);
    else memcpy(out, scores, bytes);
  }
  const bool ok = send_response(response, err);
  if (err != NULL) TRITONSERVER_ErrorDelete(err);
  return ok;
}

/* The client's request id, or a fresh random one (then a retry is a new sampling decision, as in
 * backends/serving_monitor.py). */
static const char* request_id(Instance* in, TRITONBACKEND_Request* request, char fresh[17], size_t* len) {
  const char* id = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestId(request, &id);
  log_error(err, "reading a request id");
  if (err == NULL && id != NULL && id[0] != '\0') {
    *len = strlen(id);
    return id;
  }
  in->rng ^= in->rng >> 12; /* xorshift64* */
  in->rng ^= in->rng << 25;
  in->rng ^= in->rng >> 27;
  snprintf(fresh, 17, "%016llx", (unsigned long long)(in->rng * 2685821657736338717ull));
  *len = 16;
  return fresh;
}

/* Queue the log records of requests [first, count) that the sampling rate keeps (a raw-transaction model's with
 * the batch's `raw` fields and `degraded`). */
static void log_requests(Instance* in, TRITONBACKEND_Request** requests, const Part* parts, uint32_t first,
                         uint32_t count, int64_t arrival_us, const float* scores, const float* batch,
                         const float* direct, const Raw* raw, bool degraded, uint64_t* dropped) {
  const Forest* forest = in->model->forest;
  for (uint32_t r = first; r < count; ++r) {
    char fresh[17];
    size_t id_len = 0;
    const char* id = request_id(in, requests[r], fresh, &id_len);
    if (!sampled(id, id_len, in->model->log.sample_rate)) continue;
    const Part* p = &parts[r];
    const char* error = p->error != NULL ? TRITONSERVER_ErrorMessage(p->error) : NULL;
    const bool added =
        in->model->online != NULL
            ? add_online_record(in, id, id_len, arrival_us, error, scores, batch, p->gathered ? raw : NULL,
                                p->first_row, p->rows, degraded)
        : p->error != NULL
            ? add_record(in, id, id_len, arrival_us, error, NULL, 0, NULL, 0)
            : add_record(in, id, id_len, arrival_us, NULL, scores + p->first_row * forest->width, forest->width,
                         batch != NULL ? batch + p->first_row * forest->n_features : direct, p->rows);
    *dropped += !added;
  }
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                              TRITONBACKEND_Request** requests,
                                                              const uint32_t request_count) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
  Part* parts = err == NULL ? calloc(request_count, sizeof *parts) : NULL;
  if (err == NULL && parts == NULL) err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  if (err != NULL) return err; /* nothing answered yet: Triton answers every request with it and releases them */
  Instance* in = state;
  const Model* model = in->model;
  const Forest* forest = model->forest;
  struct timespec wall;
  clock_gettime(CLOCK_REALTIME, &wall);
  const int64_t arrival_us = (int64_t)wall.tv_sec * 1000000 + wall.tv_nsec / 1000;
  /* Triton's warm-up requests come first on each instance: neither counted nor logged */
  const uint32_t warmup = in->warmup_left < request_count ? (uint32_t)in->warmup_left : request_count;
  in->warmup_left -= warmup;

  /* compute_input: check and gather every request's rows into one batch (raw transactions: their features) */
  const uint64_t exec_start = now_ns();
  int64_t batch_rows = 0;
  uint32_t good = 0;
  bool degraded = false;
  Raw raw = {0};
  float* features = model->online != NULL
                        ? online_batch(in, requests, request_count, parts, &raw, &batch_rows, &degraded)
                        : NULL;
  for (uint32_t r = 0; model->online == NULL && r < request_count; ++r) {
    if ((parts[r].error = request_input(forest, requests[r], &parts[r])) != NULL) continue;
    parts[r].first_row = batch_rows;
    batch_rows += parts[r].rows;
    good++;
  }
  const size_t row_bytes = (size_t)forest->n_features * sizeof(float);
  bool copy = good > 1 || model->online != NULL; /* one request in one buffer is scored where it lies */
  for (uint32_t r = 0; r < request_count; ++r) copy |= parts[r].error == NULL && parts[r].buffer_count != 1;
  float* scores = malloc((size_t)batch_rows * (size_t)forest->width * sizeof(float) + 1);
  float* batch = model->online != NULL ? features : copy ? malloc((size_t)batch_rows * row_bytes + 1) : NULL;
  const float* x = batch;
  const bool allocated = scores != NULL && (batch != NULL || !copy);
  for (uint32_t r = 0; r < request_count && allocated && model->online == NULL; ++r) {
    if (parts[r].error != NULL) continue;
    float* dst = copy ? batch + parts[r].first_row * forest->n_features : NULL;
    parts[r].error = gather_input(&parts[r], (uint64_t)parts[r].rows * row_bytes, dst, copy ? NULL : &x);
    if (parts[r].error != NULL && dst != NULL) /* its rows stay in the batch as zeros, scored and dropped */
      memset(dst, 0, (size_t)parts[r].rows * row_bytes);
  }

  /* compute_infer: score the batch */
  const uint64_t compute_start = now_ns();
  if (allocated && x != NULL && batch_rows > 0) forest->predict_rows(x, batch_rows, scores);
  const uint64_t compute_end = now_ns();
  for (uint32_t r = 0; r < request_count; ++r)
    if (parts[r].error == NULL && (!allocated || x == NULL))
      parts[r].error = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");

  /* the prediction log, before any response is sent: an answered request is always in the page cache */
  uint64_t dropped = 0;
  if (model->log.root[0] != '\0') {
    log_requests(in, requests, parts, warmup, request_count, arrival_us, scores, copy ? batch : NULL, x, &raw,
                 degraded, &dropped);
    dropped += journal_flush(in, arrival_us);
  }
  if (model->online != NULL) raw_free(&raw, model->online->n_fields);

  /* compute_output: write each request's rows into its outputs and send its response */
  memset(in->counts, 0, (size_t)model->n_decisions * sizeof *in->counts);
  for (uint32_t r = 0; r < request_count; ++r) {
    if (parts[r].error != NULL) {
      answer_error(requests[r], parts[r].error);
      parts[r].error = NULL;
      continue;
    }
    const float* rows = scores + parts[r].first_row * forest->width;
    parts[r].ok = respond(requests[r], rows, parts[r].rows, forest->width, model->online != NULL, degraded);
    if (!parts[r].ok || r < warmup) continue;
    log_error(TRITONSERVER_MetricObserve(model->duration, (double)(now_ns() - exec_start) / 1e9),
              "observing the request duration");
    for (int64_t k = 0; k < parts[r].rows; ++k) in->counts[decision_of(model, rows + k * forest->width, forest->width)]++;
  }
  const uint64_t exec_end = now_ns();
  for (int d = 0; d < model->n_decisions; ++d)
    if (in->counts[d] > 0)
      log_error(TRITONSERVER_MetricIncrement(model->decisions[d], (double)in->counts[d]), "counting predictions");
  uint32_t answered = 0;
  for (uint32_t r = warmup; degraded && r < request_count; ++r) answered += parts[r].ok;
  if (answered > 0)
    log_error(TRITONSERVER_MetricIncrement(model->online->degraded, (double)answered), "counting degraded answers");
  if (dropped > 0 && model->dropped != NULL)
    log_error(TRITONSERVER_MetricIncrement(model->dropped, (double)dropped), "counting dropped log records");

  uint64_t scored_rows = 0;
  for (uint32_t r = 0; r < request_count; ++r) {
    scored_rows += parts[r].ok ? (uint64_t)parts[r].rows : 0;
    log_error(TRITONBACKEND_ModelInstanceReportStatistics(instance, requests[r], parts[r].ok, exec_start,
                                                          compute_start, compute_end, exec_end),
              "reporting request statistics");
    log_error(TRITONBACKEND_RequestRelease(requests[r], REQUEST_RELEASE_ALL), "releasing a request");
  }
  if (scored_rows > 0)
    log_error(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, scored_rows, exec_start, compute_start,
                                                               compute_end, exec_end),
              "reporting batch statistics");
  free(scores);
  free(batch);
  free(parts);
  return NULL;
}
