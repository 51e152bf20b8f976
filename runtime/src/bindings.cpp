// The nanobind module qwen3pack._core: the Python face of the C++ core.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <string>
#include <vector>

#include "comm_mpi.h"
#include "common.h"
#include "crc32c.h"
#include "finite.h"
#include "engine.h"
#include "fs_ops.h"
#include "kernels.h"
#include "quant.h"
#include "sampling.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Runs fn() without the GIL. A daemon thread may still be computing when the interpreter exits,
// and taking the GIL back then ends the thread by a forced unwind, which C++ frames that cannot
// unwind turn into std::terminate (SIGABRT): such a thread parks instead, as the process is
// exiting. During finalization the GIL is kept, so that no parked thread is woken up to that end.
template <class F>
auto without_gil(F&& fn) -> decltype(fn()) {
  if (interpreter_finalizing()) return fn();
  PyThreadState* state = PyEval_SaveThread();
  auto take_gil_back = [state] {
    while (interpreter_finalizing()) std::this_thread::sleep_for(std::chrono::hours(1));
    PyEval_RestoreThread(state);
  };
  try {
    if constexpr (std::is_void_v<decltype(fn())>) {
      fn();
      take_gil_back();
    } else {
      auto result = fn();
      take_gil_back();
      return result;
    }
  } catch (...) {
    take_gil_back();
    throw;
  }
}

// Accepts any object with the buffer protocol (bytes, memoryview, numpy arrays, mmap).
uint32_t crc32c_of_buffer(nb::handle buffer, uint32_t crc) {
  Py_buffer view;
  if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
  const uint32_t result = without_gil([&] { return q3p::crc32c(crc, view.buf, static_cast<size_t>(view.len)); });
  PyBuffer_Release(&view);
  return result;
}

// ---- Reading the caller's dicts, with errors that name the field (never a crash). ----

nb::handle field(nb::dict d, const char* key, const std::string& where) {
  PyObject* v = PyDict_GetItemString(d.ptr(), key);  // borrowed
  if (!v) throw q3p::FormatError(where + ": missing key '" + key + "'");
  return nb::handle(v);
}

bool is_int(nb::handle h) { return PyLong_Check(h.ptr()) && !PyBool_Check(h.ptr()); }

int64_t as_i64(nb::handle h, const std::string& what) {
  if (!is_int(h)) throw q3p::FormatError(what + " must be an integer");
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    throw q3p::FormatError(what + " is out of range");
  }
  return v;
}

uint64_t as_u64(nb::handle h, const std::string& what) {
  if (!is_int(h)) throw q3p::FormatError(what + " must be an integer");
  unsigned long long v = PyLong_AsUnsignedLongLong(h.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw q3p::FormatError(what + " = " + nb::str(h).c_str() + " is out of range (not a 64-bit unsigned)");
  }
  return v;
}

double as_f64(nb::handle h, const std::string& what) {
  if (!(PyFloat_Check(h.ptr()) || is_int(h))) throw q3p::FormatError(what + " must be a number");
  double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw q3p::FormatError(what + " is out of range");
  }
  return v;
}

// SPEC: 8 lowercase hex digits.
uint32_t as_crc(nb::handle h, const std::string& what) {
  if (!PyUnicode_Check(h.ptr())) throw q3p::FormatError(what + " must be a string of 8 hex digits");
  std::string s = nb::cast<std::string>(h);
  if (s.size() != 8 || s.find_first_not_of("0123456789abcdef") != std::string::npos)
    throw q3p::FormatError(what + " '" + s + "' is not 8 lowercase hex digits");
  return static_cast<uint32_t>(std::stoul(s, nullptr, 16));
}

bool as_bool(nb::handle h, const std::string& what) {
  if (!PyBool_Check(h.ptr())) throw q3p::FormatError(what + " must be a boolean");
  return h.ptr() == Py_True;
}

std::string as_str(nb::handle h, const std::string& what) {
  if (!PyUnicode_Check(h.ptr())) throw q3p::FormatError(what + " must be a string");
  return nb::cast<std::string>(h);
}

nb::dict as_dict(nb::handle h, const std::string& what) {
  if (!PyDict_Check(h.ptr())) throw q3p::FormatError(what + " must be an object");
  return nb::borrow<nb::dict>(h);
}

nb::list as_list(nb::handle h, const std::string& what) {
  if (!PyList_Check(h.ptr()) && !PyTuple_Check(h.ptr())) throw q3p::FormatError(what + " must be a list");
  return nb::list(h);
}

q3p::ModelConfig parse_model(nb::dict d) {
  const std::string w = "model object";
  auto i = [&](const char* k) { return as_i64(field(d, k, w), w + "." + k); };
  q3p::ModelConfig m;
  std::string arch = as_str(field(d, "architecture", w), w + ".architecture");
  if (arch != "qwen3") throw q3p::FormatError(w + ": architecture '" + arch + "' is not qwen3");
  std::string act = as_str(field(d, "hidden_act", w), w + ".hidden_act");
  if (act != "silu") throw q3p::FormatError(w + ": hidden_act '" + act + "' is not supported (silu only)");
  m.hidden_size = i("hidden_size");
  m.intermediate_size = i("intermediate_size");
  m.num_hidden_layers = i("num_hidden_layers");
  m.num_attention_heads = i("num_attention_heads");
  m.num_key_value_heads = i("num_key_value_heads");
  m.head_dim = i("head_dim");
  m.vocab_size = i("vocab_size");
  m.max_position_embeddings = i("max_position_embeddings");
  m.rms_norm_eps = as_f64(field(d, "rms_norm_eps", w), w + ".rms_norm_eps");
  m.tie_word_embeddings = as_bool(field(d, "tie_word_embeddings", w), w + ".tie_word_embeddings");

  nb::dict rope = as_dict(field(d, "rope", w), w + ".rope");
  const std::string rw = w + ".rope";
  std::string type = as_str(field(rope, "type", rw), rw + ".type");
  m.rope.theta = as_f64(field(rope, "theta", rw), rw + ".theta");
  auto rf = [&](const char* k) { return as_f64(field(rope, k, rw), rw + "." + k); };
  if (type == "default") {
    m.rope.type = q3p::RopeType::Default;
  } else if (type == "linear") {
    m.rope.type = q3p::RopeType::Linear;
    m.rope.factor = rf("factor");
  } else if (type == "yarn") {
    m.rope.type = q3p::RopeType::Yarn;
    m.rope.factor = rf("factor");
    m.rope.original_max_position_embeddings = rf("original_max_position_embeddings");
    m.rope.beta_fast = rf("beta_fast");
    m.rope.beta_slow = rf("beta_slow");
    m.rope.truncate = as_bool(field(rope, "truncate", rw), rw + ".truncate");
    m.rope.attention_factor = rf("attention_factor");
  } else {
    throw q3p::FormatError(rw + ": type '" + type + "' is not supported (default, linear, yarn)");
  }

  nb::list types = as_list(field(d, "layer_types", w), w + ".layer_types");
  bool any_sliding = false;
  for (size_t k = 0; k < types.size(); ++k) {
    std::string t = as_str(types[k], w + ".layer_types[" + std::to_string(k) + "]");
    if (t == "sliding_attention") any_sliding = true;
    else if (t != "full_attention") throw q3p::FormatError(w + ": layer type '" + t + "' is not supported");
    m.sliding.push_back(t == "sliding_attention");
  }
  nb::handle win = field(d, "sliding_window", w);
  m.sliding_window = win.is_none() ? 0 : as_i64(win, w + ".sliding_window");
  if (!any_sliding) m.sliding_window = 0;
  return m;
}

q3p::Layout parse_layout(nb::dict d) {
  const std::string w = "layout object";
  auto i = [&](const char* k) { return as_i64(field(d, k, w), w + "." + k); };
  q3p::Layout l;
  l.world_size = i("world_size");
  std::string dt = as_str(field(d, "dtype", w), w + ".dtype");
  if (!q3p::parse_dtype(dt, &l.dtype)) throw q3p::FormatError(w + ": dtype '" + dt + "' is not supported");
  l.padded_vocab_size = i("padded_vocab_size");
  l.heads_per_rank = i("heads_per_rank");
  l.kv_heads_per_rank = i("kv_heads_per_rank");
  l.kv_head_replicas = i("kv_head_replicas");
  l.intermediate_per_rank = i("intermediate_per_rank");
  l.vocab_rows_per_rank = i("vocab_rows_per_rank");
  PyObject* overrides = PyDict_GetItemString(d.ptr(), "dtype_overrides");  // borrowed; format 1.1, optional
  if (overrides) {
    nb::dict groups = as_dict(nb::handle(overrides), w + ".dtype_overrides");
    for (auto item : groups) {
      const std::string group = as_str(item.first, w + ".dtype_overrides key");
      const std::string name = as_str(item.second, w + ".dtype_overrides." + group);
      if (group != "embed" && group != "lm_head" && group != "qkv" && group != "o_proj" && group != "gate_up" &&
          group != "down")
        throw q3p::FormatError(w + ": dtype_overrides: '" + group + "' is not a group of weights");
      q3p::DType dt;
      if (!q3p::parse_dtype(name, &dt)) throw q3p::FormatError(w + ": dtype_overrides." + group + ": dtype '" + name + "' is not supported");
      l.dtype_overrides[group] = dt;
    }
  }
  return l;
}

q3p::RankSource parse_rank(nb::dict d, size_t index) {
  std::string w = "rank " + std::to_string(index);
  q3p::RankSource s;
  s.path = as_str(field(d, "path", w), w + ".path");
  w = s.path;
  const int64_t rank = as_i64(field(d, "rank", w), w + ": rank");
  const int64_t world = as_i64(field(d, "world_size", w), w + ": world_size");
  if (rank < 0 || rank > UINT32_MAX || world < 1 || world > UINT32_MAX)
    throw q3p::FormatError(w + ": rank or world size out of range");
  s.expect.rank = static_cast<uint32_t>(rank);
  s.expect.world_size = static_cast<uint32_t>(world);
  nb::handle id = field(d, "conversion_id", w);
  if (!PyBytes_Check(id.ptr()) || PyBytes_Size(id.ptr()) != 16)
    throw q3p::FormatError(w + ": conversion_id must be 16 bytes");
  std::memcpy(s.expect.conversion_id.data(), PyBytes_AsString(id.ptr()), 16);
  s.expect.file_size = as_u64(field(d, "file_size", w), w + ": file_size");
  s.expect.data_offset = as_u64(field(d, "data_offset", w), w + ": data_offset");
  nb::list tensors = as_list(field(d, "tensors", w), w + ": tensors");
  for (size_t k = 0; k < tensors.size(); ++k) {
    nb::dict t = as_dict(tensors[k], w + ": tensor record " + std::to_string(k));
    q3p::TensorRecord r;
    r.name = as_str(field(t, "name", w), w + ": tensor record " + std::to_string(k) + " name");
    const std::string tw = w + ": tensor '" + r.name + "'";
    r.dtype = as_str(field(t, "dtype", tw), tw + " dtype");
    nb::list shape = as_list(field(t, "shape", tw), tw + " shape");
    for (size_t a = 0; a < shape.size(); ++a) r.shape.push_back(as_i64(shape[a], tw + " shape"));
    r.offset = as_u64(field(t, "offset", tw), tw + " offset");
    r.nbytes = as_u64(field(t, "nbytes", tw), tw + " nbytes");
    r.crc32c = as_crc(field(t, "crc32c", tw), tw + " crc32c");
    s.tensors.push_back(std::move(r));
  }
  return s;
}

// ---- Arrays ----

using IdArray = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using FloatArray = nb::ndarray<nb::numpy, float>;

std::vector<int32_t> ids_of(const IdArray& a) { return std::vector<int32_t>(a.data(), a.data() + a.shape(0)); }

template <class T>
nb::ndarray<nb::numpy, T> make_array(std::vector<T>&& v, std::vector<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape.size(), shape.data(), owner);
}

// ---- Objects ----

// In a child forked after the engine was made, the engine's threads and locks are the parent's:
// destroying it would join threads that do not exist (a hang). The child keeps it forever.
void abandon(std::shared_ptr<q3p::Engine>& engine) { new std::shared_ptr<q3p::Engine>(std::move(engine)); }

q3p::Engine& live(const std::shared_ptr<q3p::Engine>& engine) {
  if (!engine || engine->closed()) throw q3p::ClosedError("the model is closed");
  if (engine->forked())
    throw q3p::ForkedError("this model was loaded before the process forked: its compute threads exist only in "
                           "the parent, so a forked child cannot use it; load it again in the child (or use the "
                           "'spawn' start method of multiprocessing)");
  return *engine;
}

struct Session {
  std::shared_ptr<q3p::Engine> engine;
  std::unique_ptr<q3p::KVCache> cache;
  ~Session() {
    if (engine && engine->forked()) {
      (void)cache.release();  // its blocks would go to the engine's pool, whose lock a parent's thread may hold
      abandon(engine);
    }
  }
};

struct EngineHandle {
  std::shared_ptr<q3p::Engine> engine;
  q3p::Engine& get() const { return live(engine); }
  ~EngineHandle() {
    if (engine && engine->forked()) abandon(engine);
  }
};

std::vector<q3p::ForwardRequest> requests(const std::vector<q3p::KVCache*>& caches,
                                          const std::vector<std::vector<int32_t>>& ids,
                                          const std::vector<bool>& all_logits) {
  std::vector<q3p::ForwardRequest> batch(caches.size());
  for (size_t i = 0; i < caches.size(); ++i)
    batch[i] = {caches[i], ids[i].data(), ids[i].size(), all_logits[i]};
  return batch;
}

// The caches and token ids of Engine.forward's and Engine.check's arguments.
void batch_of(const std::vector<Session*>& sessions, const std::vector<IdArray>& ids, size_t n_flags,
              std::vector<q3p::KVCache*>& caches, std::vector<std::vector<int32_t>>& tokens) {
  if (sessions.size() != ids.size() || sessions.size() != n_flags)
    throw q3p::UsageError("sessions, ids and all_logits must have the same length");
  for (size_t i = 0; i < sessions.size(); ++i) {
    if (!sessions[i]) throw q3p::UsageError("a session is None");
    caches.push_back(sessions[i]->cache.get());
    tokens.push_back(ids_of(ids[i]));
  }
}

// Runs one batched forward with the GIL released; each request's logits are a view of its rows
// of the one buffer the forward returned, which the views own together. Copying each request's
// rows out made a second buffer of the vocabulary's size per step, and freeing both let malloc
// hand the pages back to the kernel: every decode step then faulted in and zeroed 1.2 MB afresh
// (3% of a q4 decode step at one thread, in perf).
std::vector<FloatArray> run_forward(q3p::Engine& engine, const std::vector<q3p::KVCache*>& caches,
                                    const std::vector<std::vector<int32_t>>& ids, const std::vector<bool>& all_logits) {
  const std::vector<q3p::ForwardRequest> batch = requests(caches, ids, all_logits);
  using Logits = std::shared_ptr<std::vector<float>>;
  const Logits out = std::make_shared<std::vector<float>>(without_gil([&] { return engine.forward(batch); }));
  if (engine.first_rank() != 0) return {};  // the logits are rank 0's
  const size_t vocab = static_cast<size_t>(engine.model().vocab_size);
  std::vector<FloatArray> result;
  size_t row = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const size_t rows = all_logits[i] ? ids[i].size() : 1;
    nb::capsule owner(new Logits(out), [](void* p) noexcept { delete static_cast<Logits*>(p); });
    const size_t shape[2] = {rows, vocab};
    float* first = out->data() + row * vocab;
    result.push_back(all_logits[i] ? FloatArray(first, 2, shape, owner) : FloatArray(first, 1, shape + 1, owner));
    row += rows;
  }
  return result;
}

// The rows of x quantized to activation blocks, then their product with every row of the
// quantized weights w by `kernel` (Args: MatmulQ8Args, MatmulQ4Args or MatmulQ6Args).
template <class Args, class Activations, class Quantize, class Kernel>
FloatArray quantized_product(const float* x, size_t n, size_t in, size_t out, const void* w, size_t blocks,
                             Quantize quantize, Kernel kernel) {
  std::vector<Activations> xq(n * blocks);
  for (size_t t = 0; t < n; ++t) quantize(x + t * in, in, xq.data() + t * blocks);
  std::vector<float> y(n * out);
  Args a;
  a.x = xq.data();
  a.n = n;
  a.in = in;
  a.out = out;
  a.w = static_cast<decltype(a.w)>(w);
  a.y = y.data();
  kernel(a, 0, out);
  return make_array(std::move(y), {n, out});
}

// y = x W^T with one instruction set's kernel, as the engine runs it (for the kernel tests).
// W holds the raw values of dtype `dtype` (f32, or the 16-bit patterns of bf16/f16), or for q8
// q4 and q6 the bytes of its rows of blocks, [out, row bytes] (x is then quantized as the engine does).
FloatArray matmul_with_isa(nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> x,
                           nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu> w, const std::string& dtype,
                           const std::string& isa, const std::string& activations) {
  q3p::DType dt;
  if (!q3p::parse_dtype(dtype, &dt)) throw q3p::UsageError("unknown dtype " + dtype);
  if (activations != "f32" && (activations != "bf16" || dt != q3p::DType::BF16))
    throw q3p::UsageError("activations must be 'f32', or 'bf16' for bf16 weights, got '" + activations + "'");
  const size_t n = x.shape(0), in = x.shape(1), out = w.shape(0);
  const bool blocks = dt == q3p::DType::Q8 || dt == q3p::DType::Q4 || dt == q3p::DType::Q6;
  if (blocks ? w.shape(1) * w.itemsize() != q3p::row_bytes(dt, in) : (w.shape(1) != in || w.itemsize() != q3p::dtype_size(dt)))
    throw q3p::UsageError("w must be [out, in] of " + dtype + " values");
  const q3p::Kernels kernel = q3p::select_kernels(isa.c_str());
  if (dt == q3p::DType::Q8)
    return quantized_product<q3p::MatmulQ8Args, q3p::BlockQ8Act>(x.data(), n, in, out, w.data(), q3p::q8_blocks(in),
                                                                 q3p::quantize_row_q8, kernel.matmul_q8);
  if (dt == q3p::DType::Q4)
    return quantized_product<q3p::MatmulQ4Args, q3p::BlockQ8K>(x.data(), n, in, out, w.data(), q3p::q4_blocks(in),
                                                               q3p::quantize_row_q8k, kernel.matmul_q4);
  if (dt == q3p::DType::Q6)
    return quantized_product<q3p::MatmulQ6Args, q3p::BlockQ8K16>(x.data(), n, in, out, w.data(), q3p::q4_blocks(in),
                                                                 q3p::quantize_row_q8k16, kernel.matmul_q6);
  std::vector<float> y(n * out);
  q3p::MatmulArgs a;
  a.x = x.data();
  a.n = n;
  a.in = in;
  a.out = out;
  a.w = w.data();
  a.dt = dt;
  std::vector<uint16_t> x_bf16;
  if (activations == "bf16") {
    x_bf16.resize(n * in);
    q3p::to_bf16(x.data(), x_bf16.data(), n * in);
    a.x_bf16 = x_bf16.data();
  }
  a.y = y.data();
  kernel.matmul(a, 0, out);
  return make_array(std::move(y), {n, out});
}

// Attention of the G query heads q [G, D] over keys and values k, v [n, ld >= D] (their first D
// columns: f32, or bf16 patterns with kv_dtype "bf16") at positions [first, first + n), in the
// tiles the engine uses, with one instruction set's kernel (for the kernel tests). With
// activations "bf16" and a bf16 cache, as load(..., activations="bf16") attends: q rounded to bf16
// first, and the kernel's bf16_products.
FloatArray attention_with_isa(nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu> q,
                              nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu> k,
                              nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu> v, const std::string& kv_dtype,
                              int64_t first, float scale, const std::string& isa, const std::string& activations) {
  q3p::DType dt;
  if (!q3p::parse_dtype(kv_dtype, &dt) || (dt != q3p::DType::F32 && dt != q3p::DType::BF16))
    throw q3p::UsageError("kv_dtype must be f32 or bf16");
  if (activations != "f32" && activations != "bf16") throw q3p::UsageError("activations must be f32 or bf16");
  const size_t G = q.shape(0), D = q.shape(1), n = k.shape(0), ld = k.shape(1);
  if (v.shape(0) != n || v.shape(1) != ld || ld < D || k.itemsize() != q3p::dtype_size(dt) ||
      v.itemsize() != k.itemsize() || n < 1 || first < 0)
    throw q3p::UsageError("k and v must be [n >= 1, ld >= D] of " + kv_dtype + " values, first >= 0");
  const q3p::Kernels kernel = q3p::select_kernels(isa.c_str());
  std::vector<float> out(G * D, 0.0f), max(G, -INFINITY), sum(G, 0.0f);
  std::vector<float> queries(q.data(), q.data() + G * D);
  q3p::AttentionTile a;
  a.bf16_products = activations == "bf16" && dt == q3p::DType::BF16;
  if (a.bf16_products) q3p::round_to_bf16(queries.data(), queries.size());
  a.q = queries.data();
  a.G = G;
  a.D = D;
  a.ld = ld;
  a.kv = dt;
  a.scale = scale;
  a.max = max.data();
  a.sum = sum.data();
  a.out = out.data();
  const int64_t tile = static_cast<int64_t>(q3p::kAttentionTile), last = first + static_cast<int64_t>(n);
  for (int64_t p = first; p < last;) {
    const int64_t end = std::min(last, (p / tile + 1) * tile);
    a.k = static_cast<const uint8_t*>(k.data()) + static_cast<size_t>(p - first) * ld * k.itemsize();
    a.v = static_cast<const uint8_t*>(v.data()) + static_cast<size_t>(p - first) * ld * v.itemsize();
    a.nk = static_cast<size_t>(end - p);
    kernel.attention_tile(a);
    p = end;
  }
  for (size_t g = 0; g < G; ++g) q3p::scale(out.data() + g * D, 1.0f / sum[g], D);
  return make_array(std::move(out), {G, D});
}

// x rounded to bf16 as the KV cache stores it: the 16-bit patterns.
nb::ndarray<nb::numpy, uint16_t> to_bf16(nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> x) {
  std::vector<uint16_t> bits(x.shape(0));
  q3p::to_bf16(x.data(), bits.data(), x.shape(0));
  return make_array(std::move(bits), {x.shape(0)});
}

FloatArray silu_mul(nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> gate,
                    nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> up) {
  if (gate.shape(0) != up.shape(0)) throw q3p::UsageError("gate and up must have the same length");
  std::vector<float> out(gate.shape(0));
  q3p::silu_mul(gate.data(), up.data(), out.data(), out.size());
  return make_array(std::move(out), {gate.shape(0)});
}

double fma_peak_flops(const std::string& isa, double seconds, const std::string& activations) {
  const q3p::Kernels kernel = q3p::select_kernels(isa.c_str());
  if (activations != "f32" && activations != "bf16")
    throw q3p::UsageError("activations must be 'f32' or 'bf16', got '" + activations + "'");
  return without_gil([&] { return q3p::fma_peak_flops(kernel.isa, activations == "bf16", seconds); });
}

// Seconds per all_reduce_sum of n floats, the median of `iterations` timed after as many untimed:
// over MPI (with mpi_library: one rank in every process of mpi_comm, each calling this) or between
// `ranks` threads through shared memory. For the benchmark's per-layer latency.
double all_reduce_seconds(size_t n, int iterations, const std::string& mpi_library, uint64_t mpi_comm, int ranks) {
  if (n < 1 || iterations < 1 || ranks < 1) throw q3p::UsageError("n, iterations and ranks must be >= 1");
  std::unique_ptr<q3p::Communicator> comm;
  if (mpi_library.empty()) comm = std::make_unique<q3p::SharedMemoryCommunicator>(ranks);
  else comm = std::make_unique<q3p::MpiCommunicator>(mpi_library, mpi_comm, 1);
  const int local = comm->local_ranks();
  comm->reserve(n);
  std::vector<std::vector<float>> data(static_cast<size_t>(local), std::vector<float>(n, 1.0f));
  std::vector<double> times;
  q3p::ThreadPool pool(local);
  without_gil([&] {
    pool.run(local, [&](int r) {
      for (int i = 0; i < 2 * iterations; ++i) {
        const auto start = std::chrono::steady_clock::now();
        comm->all_reduce_sum(r, data[static_cast<size_t>(r)].data(), n);
        if (r == 0 && i >= iterations)
          times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    });
  });
  std::nth_element(times.begin(), times.begin() + static_cast<std::ptrdiff_t>(times.size() / 2), times.end());
  return times[times.size() / 2];
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (q3p::Isa isa : {q3p::Isa::Generic, q3p::Isa::Avx2, q3p::Isa::Avx512})
    if (q3p::isa_supported(isa)) names.push_back(q3p::isa_name(isa));
  return names;
}

// ---- Quantizing weights (the converter) ----

template <class T>
using WeightRows = nb::ndarray<const T, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// Row r of n weights as f32 values: the row itself, or its bf16 bit patterns widened (exactly) into
// `scratch`: the converter hands a bf16 checkpoint's rows over as stored, where numpy would make
// an f32 copy of every chunk (0.3 s of CPU for Qwen3-0.6B).
const float* f32_row(const float* rows, size_t r, size_t n, std::vector<float>&) { return rows + r * n; }
const float* f32_row(const uint16_t* rows, size_t r, size_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  q3p::to_f32(rows + r * n, q3p::DType::BF16, scratch.data(), n);
  return scratch.data();
}

template <class T>
nb::ndarray<nb::numpy, uint8_t> quantize_q8_weights(WeightRows<T> x) {
  const size_t rows = x.shape(0), columns = x.shape(1), blocks = q3p::q8_blocks(columns);
  std::vector<uint8_t> out(rows * blocks * sizeof(q3p::BlockQ8));
  bool ok = true;
  {
    nb::gil_scoped_release unlocked;
    auto* stored = reinterpret_cast<q3p::BlockQ8*>(out.data());
    std::vector<float> scratch;
    for (size_t r = 0; r < rows && ok; ++r)
      ok = q3p::quantize_row_q8_weights(f32_row(x.data(), r, columns, scratch), columns, stored + r * blocks);
  }
  if (!ok) throw std::overflow_error("a block's scale exceeds the f16 range");
  return make_array(std::move(out), {rows, blocks * sizeof(q3p::BlockQ8)});
}

// Rows quantized by a search (q4, q6: Block, quantize_rows_*_weights) into blocks of 256.
template <class Block, class T, class Quantize>
nb::ndarray<nb::numpy, uint8_t> quantize_searched(WeightRows<T> x, Quantize quantize) {
  const size_t rows = x.shape(0), columns = x.shape(1), blocks = q3p::q4_blocks(columns);
  std::vector<uint8_t> out(rows * blocks * sizeof(Block));
  auto* stored = reinterpret_cast<Block*>(out.data());
  // The search costs about 200 operations a weight: every core takes rows, one at a time, so that
  // a core that another thread slows (the converter's hashing) leaves its share to the others.
  const size_t threads = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), rows));
  std::atomic<size_t> next_row{0};
  std::atomic<bool> ok{true};
  {
    nb::gil_scoped_release unlocked;
    auto quantize_rows = [&] {
      std::vector<float> scratch;
      for (size_t r; ok.load(std::memory_order_relaxed) && (r = next_row.fetch_add(1)) < rows;)
        if (!quantize(f32_row(x.data(), r, columns, scratch), 1, columns, stored + r * blocks)) ok = false;
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(quantize_rows);
    quantize_rows();
    for (std::thread& thread : pool) thread.join();
  }
  if (!ok) throw std::overflow_error("a block's scale exceeds the f16 range");
  return make_array(std::move(out), {rows, blocks * sizeof(Block)});
}

template <class T>
nb::ndarray<nb::numpy, uint8_t> quantize_q4_weights(WeightRows<T> x) {
  return quantize_searched<q3p::BlockQ4>(x, q3p::quantize_rows_q4_weights);
}

template <class T>
nb::ndarray<nb::numpy, uint8_t> quantize_q6_weights(WeightRows<T> x) {
  return quantize_searched<q3p::BlockQ6>(x, q3p::quantize_rows_q6_weights);
}

// A converter's quantizer under one name for both of its inputs: float32 values, or bf16 bit
// patterns as uint16.
template <class F32, class BF16>
void def_quantizer(nb::module_& m, const char* name, F32 f32, BF16 bf16, const std::string& what) {
  const std::string doc = "Rows of weights [rows, columns], float32 values or bf16 bit patterns (uint16), " + what +
                          "; OverflowError when a block's scale exceeds the f16 range.";
  m.def(name, f32, "x"_a, doc.c_str());
  m.def(name, bf16, "x"_a, doc.c_str());
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "qwen3pack's C++ core";
  m.def("crc32c", &crc32c_of_buffer, nb::arg("buffer"), nb::arg("crc") = 0,
        "CRC32C (Castagnoli) of a contiguous buffer, continuing from `crc` (0 to start).");
  m.def("first_nonfinite", [](nb::ndarray<const uint16_t, nb::c_contig, nb::device::cpu> bits, uint16_t mask) {
          return without_gil([&] { return q3p::first_nonfinite(bits.data(), bits.size(), mask); });
        }, "bits"_a, "exponent_mask"_a);
  m.def("first_nonfinite", [](nb::ndarray<const uint32_t, nb::c_contig, nb::device::cpu> bits, uint32_t mask) {
          return without_gil([&] { return q3p::first_nonfinite(bits.data(), bits.size(), mask); });
        }, "bits"_a, "exponent_mask"_a,
        "The flat index of the first value (bf16/f16 as uint16, f32 as uint32 bit patterns) whose exponent "
        "bits are all ones (NaN or infinite), or -1.");
  m.def("rename_noreplace", &q3p::rename_noreplace, nb::arg("source"), nb::arg("target"),
        "renameat2(RENAME_NOREPLACE): 0, or the errno (EEXIST when `target` exists).");
  m.def("rename_exchange", &q3p::rename_exchange, nb::arg("a"), nb::arg("b"),
        "renameat2(RENAME_EXCHANGE): swaps two paths atomically; 0, or the errno.");
  m.def("supported_isas", &supported_isas, "The matrix kernels' instruction sets this machine runs, generic first.");
  m.def("fma_peak_flops", &fma_peak_flops, "isa"_a = "", "seconds"_a = 0.2, "activations"_a = "f32",
        "f32 FMA operations per second of one thread from registers (isa: QWEN3PACK_ISA's names, '' the best); "
        "activations='bf16': of the bf16 dot product the kernels use for them (vdpbf16ps), where they use one.");
  m.def("all_reduce_seconds", &all_reduce_seconds, "n"_a, "iterations"_a, "mpi_library"_a = "", "mpi_comm"_a = 0,
        "ranks"_a = 2,
        "Median seconds of an all-reduce of n floats: over MPI (mpi_library: the loaded libmpi; mpi_comm: a "
        "communicator whose every process calls this) or between `ranks` threads through shared memory.");
  m.def("attention", &attention_with_isa, "q"_a, "k"_a, "v"_a, "kv_dtype"_a, "first"_a, "scale"_a, "isa"_a,
        "activations"_a = "f32",
        "Attention of q [G, D] over k, v [n, ld] at positions [first, first + n), tiled as the engine does "
        "(activations='bf16' with kv_dtype='bf16': in bf16 activations' precision, as the engine attends then).");
  m.attr("ATTENTION_TILE") = q3p::kAttentionTile;
  m.def("to_bf16", &to_bf16, "x"_a, "float32 values rounded to bf16 (ties to even), as uint16 bit patterns.");
  m.def("silu_mul", &silu_mul, "gate"_a, "up"_a, "silu(gate) * up, as the MLP computes it.");
  m.def("matmul", &matmul_with_isa, "x"_a, "w"_a, "dtype"_a, "isa"_a, "activations"_a = "f32",
        "x @ W.T with the kernel of instruction set `isa` (W: f32 values or bf16/f16 bit patterns, or q8/q4/q6 "
        "rows of blocks as bytes [out, row bytes]; activations='bf16': x rounded to bf16 first, as "
        "load(..., activations='bf16') does).");
  def_quantizer(m, "quantize_q8_weights", &quantize_q8_weights<float>, &quantize_q8_weights<uint16_t>,
                "as q8 blocks [rows, blocks * 34 bytes], by the converter's rule (formats.dtypes.quantize_q8 gives "
                "the same bytes)");
  def_quantizer(m, "quantize_q4_weights", &quantize_q4_weights<float>, &quantize_q4_weights<uint16_t>,
                "as q4 blocks [rows, blocks * 144 bytes], by the converter's rule (formats.dtypes.quantize_q4 gives "
                "the same bytes), over every core");
  def_quantizer(m, "quantize_q6_weights", &quantize_q6_weights<float>, &quantize_q6_weights<uint16_t>,
                "as q6 blocks [rows, blocks * 210 bytes], by the converter's rule (formats.dtypes.quantize_q6 gives "
                "the same bytes), over every core");
  m.def("quantize_q8", [](nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> x) {
          const size_t n = x.shape(0);
          std::vector<q3p::BlockQ8Act> blocks(q3p::q8_blocks(n));
          q3p::quantize_row_q8(x.data(), n, blocks.data());
          std::vector<float> d;
          std::vector<int8_t> q;
          for (const q3p::BlockQ8Act& b : blocks) {
            d.push_back(b.d);
            q.insert(q.end(), b.q, b.q + q3p::kQ8Block);
          }
          return nb::make_tuple(make_array(std::move(d), {blocks.size()}), make_array(std::move(q), {blocks.size(), q3p::kQ8Block}));
        }, "x"_a, "The scales and int8 values of the runtime's activation quantizer (for the tests).");

  nb::exception<q3p::FormatError>(m, "FormatError", PyExc_ValueError);
  nb::exception<q3p::UsageError>(m, "UsageError", PyExc_ValueError);
  nb::exception<q3p::ContextLengthError>(m, "ContextLengthError", PyExc_ValueError);
  nb::exception<q3p::ClosedError>(m, "ClosedError", PyExc_RuntimeError);
  nb::exception<q3p::ForkedError>(m, "ForkedError", PyExc_RuntimeError);
  nb::exception<q3p::NumericalError>(m, "NumericalError", PyExc_RuntimeError);

  nb::class_<Session>(m, "Session", "A sequence with its KV cache (made by Engine.new_session).")
      .def_prop_ro("position", [](const Session& s) { return s.cache->position(); })
      .def_prop_ro("kv_cache_bytes", [](const Session& s) { return s.cache->bytes(); })
      .def("append",
           [](Session& s, const IdArray& ids, bool all_logits) {
             auto r = run_forward(live(s.engine), {s.cache.get()}, {ids_of(ids)}, {all_logits});
             return r[0];
           },
           "ids"_a, "all_logits"_a = false,
           "Feeds tokens; returns float32 logits [vocab] of the last one ([n, vocab] with all_logits).")
      .def("fork",
           [](const Session& s) {
             auto copy = std::make_unique<Session>();
             copy->cache = live(s.engine).copy_cache(*s.cache);
             copy->engine = s.engine;
             return copy.release();
           },
           nb::rv_policy::take_ownership, "An independent copy of this sequence.")
      .def("reset", [](Session& s) { live(s.engine).reset_cache(*s.cache); }, "Empties the sequence.")
      .def("truncate", [](Session& s, int64_t length) { live(s.engine).truncate_cache(*s.cache, length); }, "length"_a,
           "Keeps the first `length` tokens.");

  nb::class_<EngineHandle>(m, "Engine", "The model's rank files, mapped and checked, and the threads computing them.")
      .def("__init__",
           [](EngineHandle* self, nb::dict model, nb::dict layout, nb::list ranks, int threads, int64_t max_context,
              bool verify_crc, const std::string& kv_dtype, bool bf16_activations,
              std::string mpi_library, uint64_t mpi_comm) {
             q3p::ModelConfig mc = parse_model(model);
             q3p::Layout lc = parse_layout(layout);
             std::vector<q3p::RankSource> sources;
             for (size_t i = 0; i < ranks.size(); ++i) sources.push_back(parse_rank(as_dict(ranks[i], "rank entry"), i));
             q3p::EngineOptions opt;
             opt.threads = threads;
             opt.max_context = max_context;
             opt.verify_crc = verify_crc;
             if (!q3p::parse_dtype(kv_dtype, &opt.kv_dtype))  // the engine says which dtypes it stores
               throw q3p::UsageError("kv_dtype must be 'f32' or 'bf16', got '" + kv_dtype + "'");
             opt.bf16_activations = bf16_activations;
             auto engine = without_gil([&] {
               std::unique_ptr<q3p::Communicator> comm;
               if (!mpi_library.empty())
                 comm = std::make_unique<q3p::MpiCommunicator>(mpi_library, mpi_comm, static_cast<int>(sources.size()));
               return std::make_shared<q3p::Engine>(mc, lc, sources, opt, std::move(comm));
             });
             new (self) EngineHandle{std::move(engine)};
           },
           "model"_a, "layout"_a, "ranks"_a, "threads"_a, "max_context"_a, "verify_crc"_a, "kv_dtype"_a = "f32",
           "bf16_activations"_a = false, "mpi_library"_a = "", "mpi_comm"_a = 0,
           "ranks: the rank files this process computes. With mpi_library (the path of the loaded, initialized "
           "libmpi) the ranks are those this process holds of the MPI communicator mpi_comm (an MPICH ABI handle), "
           "else all of them, as threads.")
      .def("close",
           [](EngineHandle& h) {
             if (!h.engine) return;
             if (h.engine->forked()) return abandon(h.engine);
             without_gil([&] { h.engine->close(); });  // waits for a forward in flight
           })
      .def_prop_ro("closed", [](const EngineHandle& h) { return !h.engine || h.engine->closed(); })
      .def_prop_ro("vocab_size", [](const EngineHandle& h) { return h.get().model().vocab_size; })
      .def_prop_ro("max_context", [](const EngineHandle& h) { return h.get().max_context(); })
      .def_prop_ro("world_size", [](const EngineHandle& h) { return h.get().layout().world_size; })
      .def_prop_ro("threads", [](const EngineHandle& h) { return h.get().threads(); })
      .def_prop_ro("threads_per_rank", [](const EngineHandle& h) { return h.get().threads_per_rank(); })
      .def_prop_ro("first_rank", [](const EngineHandle& h) { return h.get().first_rank(); })
      .def_prop_ro("local_ranks", [](const EngineHandle& h) { return h.get().local_ranks(); })
      .def_prop_ro("isa", [](const EngineHandle& h) { return std::string(h.get().isa()); })
      .def_prop_ro("kv_dtype", [](const EngineHandle& h) { return std::string(q3p::dtype_name(h.get().kv_dtype())); })
      .def_prop_ro("activations", [](const EngineHandle& h) { return h.get().bf16_activations() ? "bf16" : "f32"; })
      .def("new_session",
           [](const EngineHandle& h) {
             auto s = std::make_unique<Session>();
             s->engine = h.engine;
             s->cache = h.get().new_cache();
             return s.release();
           },
           nb::rv_policy::take_ownership)
      .def("forward",
           [](const EngineHandle& h, std::vector<Session*> sessions, std::vector<IdArray> ids, std::vector<bool> all_logits) {
             q3p::Engine& e = h.get();
             std::vector<q3p::KVCache*> caches;
             std::vector<std::vector<int32_t>> tokens;
             batch_of(sessions, ids, all_logits.size(), caches, tokens);
             return run_forward(e, caches, tokens, all_logits);
           },
           "sessions"_a, "ids"_a, "all_logits"_a,
           "One batched forward: appends ids[i] to sessions[i] for every i; logits per session.")
      .def("check",
           [](const EngineHandle& h, std::vector<Session*> sessions, std::vector<IdArray> ids) {
             q3p::Engine& e = h.get();
             std::vector<q3p::KVCache*> caches;
             std::vector<std::vector<int32_t>> tokens;
             batch_of(sessions, ids, ids.size(), caches, tokens);
             e.check(requests(caches, tokens, std::vector<bool>(ids.size(), false)));
           },
           "sessions"_a, "ids"_a, "Raises what forward(sessions, ids, ...) would raise before computing; computes nothing.")
      .def("logits_batch",
           [](const EngineHandle& h, std::vector<IdArray> ids) {
             q3p::Engine& e = h.get();
             std::vector<std::unique_ptr<q3p::KVCache>> owned;
             std::vector<q3p::KVCache*> caches;
             std::vector<std::vector<int32_t>> tokens;
             for (const IdArray& a : ids) {
               owned.push_back(e.new_cache());
               caches.push_back(owned.back().get());
               tokens.push_back(ids_of(a));
             }
             return run_forward(e, caches, tokens, std::vector<bool>(ids.size(), true));
           },
           "ids"_a, "Fresh sequences in one batched forward; logits [len_i, vocab] of every position.");

  nb::class_<q3p::Sampler>(m, "Sampler", "Seeded next-token choice with penalties and filters.")
      .def("__init__",
           [](q3p::Sampler* self, size_t vocab_size, double temperature, int64_t top_k, double top_p, double min_p,
              double presence_penalty, double repetition_penalty, uint64_t seed) {
             q3p::SamplingParams p;
             p.temperature = temperature;
             p.top_k = top_k;
             p.top_p = top_p;
             p.min_p = min_p;
             p.presence_penalty = presence_penalty;
             p.repetition_penalty = repetition_penalty;
             new (self) q3p::Sampler(p, seed, vocab_size);
           },
           "vocab_size"_a, "temperature"_a = 0.0, "top_k"_a = 0, "top_p"_a = 1.0, "min_p"_a = 0.0,
           "presence_penalty"_a = 0.0, "repetition_penalty"_a = 1.0, "seed"_a = 0)
      .def("add_prompt", [](q3p::Sampler& s, const IdArray& ids) { s.add_prompt(ids.data(), ids.shape(0)); })
      .def("accept", &q3p::Sampler::accept)
      .def("sample",
           [](q3p::Sampler& s, nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> logits) {
             if (logits.shape(0) != s.vocab_size())
               throw q3p::UsageError("logits have " + std::to_string(logits.shape(0)) + " values, expected " +
                                     std::to_string(s.vocab_size()));
             return s.sample(logits.data());
           },
           "logits"_a);
}
