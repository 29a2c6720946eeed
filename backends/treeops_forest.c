/* treeops_forest: a Triton backend (C, no Python in the request path) that scores a tl2cgen forest.
 *
 * Built by export/targets/native_compiled.py into each version folder as libtriton_treeops_forest.so,
 * next to forest.so (export/compiled_forest.py). Triton looks for a model's backend library in the
 * version folder first, so every version carries the exact backend it was exported with.
 *
 * Per model: dlopen <repository>/<model>/<version>/forest.so and look up predict_rows, treeops_width
 * and treeops_n_features. Per request: one FP32 input [rows, n_features] -> every requested output
 * as FP32 [rows, width], computed row by row (a row's scores never depend on its batch), written
 * straight into Triton's output buffer. Statistics are reported so Triton's figures attribute the
 * time: compute_input = waiting for earlier requests of the same execution, compute_infer = reading
 * the input and scoring, compute_output = sending the response (Triton serializes it for the client).
 *
 * Only the Triton C API functions used here are declared below (TRITONBACKEND API 1.x, as in
 * tritonbackend.h / tritonserver.h); the library resolves them from the running tritonserver.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- the Triton C API subset (opaque handles; enum values fixed by the API) ---- */
typedef struct TRITONSERVER_Error TRITONSERVER_Error;
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
#define BACKEND_API_MAJOR 1u

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* msg);
extern const char* TRITONSERVER_ErrorMessage(TRITONSERVER_Error* error);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONSERVER_LogMessage(int level, const char* filename, const int line, const char* msg);
extern TRITONSERVER_Error* TRITONBACKEND_ApiVersion(uint32_t* major, uint32_t* minor);
extern TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model, int* artifact_type,
                                                        const char** location);
extern TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model, uint64_t* version);
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
extern TRITONSERVER_Error* TRITONBACKEND_ResponseDelete(TRITONBACKEND_Response* response);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response,
                                                       TRITONBACKEND_Output** output, const char* name,
                                                       const int datatype, const int64_t* shape,
                                                       const uint32_t dims_count);
extern TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output, void** buffer,
                                                     const uint64_t buffer_byte_size, int* memory_type,
                                                     int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response, const uint32_t send_flags,
                                                     TRITONSERVER_Error* error);

/* ---- the forest ---- */
typedef void (*predict_rows_fn)(const float* x, int64_t rows, float* out);
typedef int (*int_fn)(void);

typedef struct {
  void* library;
  predict_rows_fn predict_rows;
  int64_t width;
  int64_t n_features;
} Forest;

static TRITONSERVER_Error* errorf(int code, const char* fmt, const char* a, const char* b) {
  char msg[8192];
  snprintf(msg, sizeof msg, fmt, a, b);
  return TRITONSERVER_ErrorNew(code, msg);
}

/* Log `err` (if any) at error level and delete it. */
static void log_error(TRITONSERVER_Error* err, const char* what) {
  if (err == NULL) return;
  char msg[1024];
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

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  (void)backend;
  uint32_t major = 0, minor = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ApiVersion(&major, &minor);
  if (err != NULL) return err;
  if (major != BACKEND_API_MAJOR)
    return TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED,
                                 "treeops_forest was written for TRITONBACKEND API 1.x; this Triton has another major");
  return NULL;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  int artifact = -1;
  const char* location = NULL;
  uint64_t version = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelRepository(model, &artifact, &location);
  if (err == NULL) err = TRITONBACKEND_ModelVersion(model, &version);
  if (err != NULL) return err;
  if (artifact != ARTIFACT_FILESYSTEM)
    return errorf(ERROR_UNSUPPORTED, "treeops_forest reads forest.so from a local folder; %s is not one%s",
                  location, "");
  char path[4096], ver[32];
  snprintf(ver, sizeof ver, "%llu", (unsigned long long)version);
  if (snprintf(path, sizeof path, "%s/%s/forest.so", location, ver) >= (int)sizeof path)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: model path too long: %s%s", location, "");

  Forest* forest = calloc(1, sizeof *forest);
  if (forest == NULL) return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
  forest->library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (forest->library == NULL) {
    err = errorf(ERROR_NOT_FOUND, "treeops_forest cannot load %s: %s (re-export the version with "
                 "--target native-compiled)", path, dlerror());
    free(forest);
    return err;
  }
  forest->predict_rows = (predict_rows_fn)dlsym(forest->library, "predict_rows");
  int_fn width = (int_fn)dlsym(forest->library, "treeops_width");
  int_fn n_features = (int_fn)dlsym(forest->library, "treeops_n_features");
  if (forest->predict_rows == NULL || width == NULL || n_features == NULL) {
    err = errorf(ERROR_INVALID_ARG, "treeops_forest: %s lacks predict_rows/treeops_width/treeops_n_features "
                 "(not written by treeops export?)%s", path, "");
    dlclose(forest->library);
    free(forest);
    return err;
  }
  forest->width = width();
  forest->n_features = n_features();
  return TRITONBACKEND_ModelSetState(model, forest);
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelState(model, &state);
  if (err != NULL) return err;
  Forest* forest = state;
  if (forest != NULL) {
    dlclose(forest->library);
    free(forest);
  }
  return NULL;
}

/* The request's feature rows as one CPU array (*owned is set when pieces had to be gathered). */
static TRITONSERVER_Error* input_rows(TRITONBACKEND_Input* input, uint32_t buffer_count, uint64_t byte_size,
                                      const float** x, float** owned) {
  uint64_t offset = 0;
  for (uint32_t b = 0; b < buffer_count; ++b) {
    const void* piece = NULL;
    uint64_t piece_size = 0;
    int memory_type = MEMORY_CPU;
    int64_t memory_id = 0;
    TRITONSERVER_Error* err = TRITONBACKEND_InputBuffer(input, b, &piece, &piece_size, &memory_type, &memory_id);
    if (err != NULL) return err;
    if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED)
      return TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest scores CPU tensors only (instance kind CPU)");
    if (buffer_count == 1) {
      *x = piece;
      return NULL;
    }
    if (*owned == NULL && (*owned = malloc(byte_size)) == NULL)
      return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "treeops_forest: out of memory");
    if (offset + piece_size > byte_size)
      return TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "treeops_forest: input buffers exceed the input's size");
    memcpy((char*)*owned + offset, piece, piece_size);
    offset += piece_size;
  }
  *x = *owned;
  return NULL;
}

/* Score one request into `response`; returns the error to answer with, or NULL and the row count. */
static TRITONSERVER_Error* score_request(const Forest* forest, TRITONBACKEND_Request* request,
                                         TRITONBACKEND_Response* response, uint64_t* rows_out) {
  uint32_t n_inputs = 0, n_outputs = 0, dims = 0, buffer_count = 0;
  TRITONBACKEND_Input* input = NULL;
  const char* name = NULL;
  int datatype = 0;
  const int64_t* shape = NULL;
  uint64_t byte_size = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInputCount(request, &n_inputs);
  if (err != NULL) return err;
  if (n_inputs != 1)
    return TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "treeops_forest takes exactly one input: the feature tensor");
  if ((err = TRITONBACKEND_RequestInputByIndex(request, 0, &input)) != NULL) return err;
  if ((err = TRITONBACKEND_InputProperties(input, &name, &datatype, &shape, &dims, &byte_size, &buffer_count)))
    return err;
  if (datatype != TYPE_FP32 || dims != 2 || shape[1] != forest->n_features || shape[0] < 0)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: input '%s' must be FP32 [rows, n_features] as in the "
                  "model's config%s", name, "");
  const int64_t rows = shape[0];
  if ((uint64_t)rows * (uint64_t)forest->n_features * sizeof(float) != byte_size)
    return errorf(ERROR_INVALID_ARG, "treeops_forest: input '%s' holds the wrong number of bytes for its shape%s",
                  name, "");

  const float* x = NULL;
  float* owned = NULL;
  err = input_rows(input, buffer_count, byte_size, &x, &owned);
  if (err == NULL) err = TRITONBACKEND_RequestOutputCount(request, &n_outputs);
  const int64_t out_shape[2] = {rows, forest->width};
  const uint64_t out_bytes = (uint64_t)rows * (uint64_t)forest->width * sizeof(float);
  for (uint32_t o = 0; o < n_outputs && err == NULL; ++o) {
    const char* out_name = NULL;
    TRITONBACKEND_Output* output = NULL;
    void* out = NULL;
    int memory_type = MEMORY_CPU;
    int64_t memory_id = 0;
    if ((err = TRITONBACKEND_RequestOutputName(request, o, &out_name))) break;
    if ((err = TRITONBACKEND_ResponseOutput(response, &output, out_name, TYPE_FP32, out_shape, 2))) break;
    if ((err = TRITONBACKEND_OutputBuffer(output, &out, out_bytes, &memory_type, &memory_id))) break;
    if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED) {
      err = TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "treeops_forest writes CPU tensors only");
      break;
    }
    if (rows > 0) forest->predict_rows(x, rows, out);
  }
  free(owned);
  *rows_out = err == NULL ? (uint64_t)rows : 0;
  return err;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                       TRITONBACKEND_Request** requests,
                                                       const uint32_t request_count) {
  TRITONBACKEND_Model* model = NULL;
  void* state = NULL;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
  if (err == NULL) err = TRITONBACKEND_ModelState(model, &state);
  if (err != NULL) return err; /* Triton answers every request with it and releases them */
  const Forest* forest = state;

  const uint64_t exec_start = now_ns();
  uint64_t batch_rows = 0;
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    const uint64_t compute_start = now_ns();
    TRITONBACKEND_Response* response = NULL;
    uint64_t rows = 0, scored = 0;
    bool ok = false;
    TRITONSERVER_Error* new_err = TRITONBACKEND_ResponseNew(&response, request);
    if (new_err == NULL) {
      TRITONSERVER_Error* failure = score_request(forest, request, response, &rows);
      scored = now_ns();
      TRITONSERVER_Error* send_err = TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, failure);
      ok = failure == NULL && send_err == NULL;
      if (send_err != NULL) log_error(TRITONBACKEND_ResponseDelete(response), "deleting an unsent response");
      log_error(send_err, "sending a response");
      if (failure != NULL) TRITONSERVER_ErrorDelete(failure); /* sending an error does not take it over */
    } else {
      log_error(new_err, "creating a response");
    }
    const uint64_t sent = now_ns();
    batch_rows += rows;
    log_error(TRITONBACKEND_ModelInstanceReportStatistics(instance, request, ok, exec_start, compute_start,
                                                          scored ? scored : sent, sent),
              "reporting request statistics");
    log_error(TRITONBACKEND_RequestRelease(request, REQUEST_RELEASE_ALL), "releasing a request");
  }
  const uint64_t exec_end = now_ns();
  if (batch_rows > 0)
    log_error(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, batch_rows, exec_start, exec_start,
                                                               exec_end, exec_end),
              "reporting batch statistics");
  return NULL;
}
