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
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
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
enum { PARAMETER_STRING = 0 };                                    /* TRITONSERVER_PARAMETER_STRING */
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

/* ---- what a served version records: metrics and the prediction log's identity ---- */
enum { KIND_BINARY, KIND_MULTICLASS, KIND_REGRESSION };
enum { DECISION_NAME = 32 };

typedef struct {
  Forest* forest;
  const char* name;  /* Triton's, valid while the model is loaded */
  uint64_t version;
  int kind;          /* the objective's, from treeops.json: what a row's decision is */
  double threshold;
  int n_decisions;   /* binary: positive, negative; multiclass: one per class; regression: value */
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
  free(text);
  return err;
}

/* Served feature names (feature_spec.json, or f0..fN-1 for a forest exported without one) into the
 * journal header, as backends/python_model.py names the log's feature columns. */
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
  const size_t cap = 256 + 6 * strlen(m->name) + (size_t)n * (6 * 512 + 4) + 20;
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
      if (i > 0) j[len++] = ',';
      if (err == NULL) len += json_quote(j + len, name);
    }
    len += (size_t)sprintf(j + len, "]}");
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
 *   1 failed), the request id, then for an answered request rows x f32 score (the last output column) and
 *   rows x n_features f32 features, for a failed one its error message.
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

/* Queue one request's record in this call's buffer: answered (`scores` rows x width, `x` rows x n_features)
 * or failed (`error`). False when out of memory (the record is dropped). */
static bool add_record(Instance* in, const char* id, size_t id_len, int64_t arrival_us, const char* error,
                       const float* scores, int64_t width, const float* x, int64_t rows) {
  const int64_t n_features = in->model->forest->n_features;
  const size_t error_len = error != NULL ? strlen(error) : 0;
  const size_t body = error != NULL ? error_len : (size_t)rows * (size_t)(1 + n_features) * sizeof(float);
  const size_t payload = RECORD_FIXED + id_len + body;
  if (id_len > 0xFFFF || payload > 0xFFFFFFFFu || !reserve(in, FRAME + payload)) return false;
  char* p = in->buf + in->size + FRAME;
  const uint32_t count = error != NULL ? (uint32_t)error_len : (uint32_t)rows, length = (uint32_t)payload;
  const uint16_t id_size = (uint16_t)id_len;
  const uint8_t status = error != NULL;
  memcpy(p, &arrival_us, 8);
  memcpy(p + 8, &count, 4);
  memcpy(p + 12, &id_size, 2);
  memcpy(p + 14, &status, 1);
  memcpy(p + RECORD_FIXED, id, id_len);
  char* q = p + RECORD_FIXED + id_len;
  if (error != NULL) {
    memcpy(q, error, error_len);
  } else {
    for (int64_t r = 0; r < rows; ++r) memcpy(q + r * (int64_t)sizeof(float), scores + r * width + width - 1, sizeof(float));
    memcpy(q + (size_t)rows * sizeof(float), x, (size_t)rows * (size_t)n_features * sizeof(float));
  }
  const uint32_t crc = crc32_of(p, payload);
  memcpy(in->buf + in->size, &length, 4);
  memcpy(in->buf + in->size + 4, &crc, 4);
  in->size += FRAME + payload;
  in->records++;
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
  if (err == NULL) err = check_config(&v, (Json){text}, metadata, m->forest);
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

/* Queue the log records of requests [first, count) that the sampling rate keeps. */
static void log_requests(Instance* in, TRITONBACKEND_Request** requests, const Part* parts, uint32_t first,
                         uint32_t count, int64_t arrival_us, const float* scores, const float* batch,
                         const float* direct, uint64_t* dropped) {
  const Forest* forest = in->model->forest;
  for (uint32_t r = first; r < count; ++r) {
    char fresh[17];
    size_t id_len = 0;
    const char* id = request_id(in, requests[r], fresh, &id_len);
    if (!sampled(id, id_len, in->model->log.sample_rate)) continue;
    const Part* p = &parts[r];
    const bool added =
        p->error != NULL
            ? add_record(in, id, id_len, arrival_us, TRITONSERVER_ErrorMessage(p->error), NULL, 0, NULL, 0)
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

  /* compute_input: check and gather every request's rows into one batch */
  const uint64_t exec_start = now_ns();
  int64_t batch_rows = 0;
  uint32_t good = 0;
  for (uint32_t r = 0; r < request_count; ++r) {
    if ((parts[r].error = request_input(forest, requests[r], &parts[r])) != NULL) continue;
    parts[r].first_row = batch_rows;
    batch_rows += parts[r].rows;
    good++;
  }
  const size_t row_bytes = (size_t)forest->n_features * sizeof(float);
  bool copy = good > 1; /* one request in one buffer is scored where it lies */
  for (uint32_t r = 0; r < request_count; ++r) copy |= parts[r].error == NULL && parts[r].buffer_count != 1;
  float* scores = malloc((size_t)batch_rows * (size_t)forest->width * sizeof(float) + 1);
  float* batch = copy ? malloc((size_t)batch_rows * row_bytes + 1) : NULL;
  const float* x = batch;
  const bool allocated = scores != NULL && (batch != NULL || !copy);
  for (uint32_t r = 0; r < request_count && allocated; ++r) {
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
    log_requests(in, requests, parts, warmup, request_count, arrival_us, scores, copy ? batch : NULL, x, &dropped);
    dropped += journal_flush(in, arrival_us);
  }

  /* compute_output: write each request's rows into its outputs and send its response */
  memset(in->counts, 0, (size_t)model->n_decisions * sizeof *in->counts);
  for (uint32_t r = 0; r < request_count; ++r) {
    if (parts[r].error != NULL) {
      answer_error(requests[r], parts[r].error);
      parts[r].error = NULL;
      continue;
    }
    const float* rows = scores + parts[r].first_row * forest->width;
    parts[r].ok = respond(requests[r], rows, parts[r].rows, forest->width);
    if (!parts[r].ok || r < warmup) continue;
    log_error(TRITONSERVER_MetricObserve(model->duration, (double)(now_ns() - exec_start) / 1e9),
              "observing the request duration");
    for (int64_t k = 0; k < parts[r].rows; ++k) in->counts[decision_of(model, rows + k * forest->width, forest->width)]++;
  }
  const uint64_t exec_end = now_ns();
  for (int d = 0; d < model->n_decisions; ++d)
    if (in->counts[d] > 0)
      log_error(TRITONSERVER_MetricIncrement(model->decisions[d], (double)in->counts[d]), "counting predictions");
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
