#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include <pthread.h>

#include "kernels.h"

namespace q3p {

namespace {
std::atomic<uint64_t> next_engine_id{1};

// Counts the forks this process came out of as a child: an engine made before a fork finds its
// rank threads missing in the child (only the forking thread is copied).
std::atomic<uint64_t> forks_as_child{0};
void count_fork_in_child() { forks_as_child.fetch_add(1); }
std::once_flag fork_handler_registered;
}  // namespace

Engine::Engine(const ModelConfig& model, const Layout& layout, const std::vector<RankSource>& ranks,
               const EngineOptions& options, std::unique_ptr<Communicator> comm)
    : model_(model),
      layout_(layout),
      max_context_(options.max_context),
      bf16_activations_(options.bf16_activations),
      id_(next_engine_id++) {
  std::call_once(fork_handler_registered, [] { pthread_atfork(nullptr, nullptr, count_fork_in_child); });
  forks_at_creation_ = forks_as_child.load();
  validate_model(model_);
  const int64_t L = static_cast<int64_t>(ranks.size());
  if (L < 1) throw FormatError("no rank files");
  if (!comm) comm = std::make_unique<SharedMemoryCommunicator>(static_cast<int>(L));
  const int64_t W = comm->world_size(), first = comm->first_rank();
  if (comm->local_ranks() != L)
    throw UsageError(std::to_string(L) + " rank files were given to a process that holds " +
                     std::to_string(comm->local_ranks()) + " ranks");
  if (layout.world_size != W)
    throw FormatError("layout object: world_size = " + std::to_string(layout.world_size) + " but " +
                      (first == 0 && L == W ? std::to_string(W) + " rank files were given"
                                            : "the processes hold " + std::to_string(W) + " ranks in all"));
  check_layout(layout_, derive_layout(model_, W, layout.dtype));
  if (max_context_ < 1 || max_context_ > (int64_t(1) << 24))
    throw UsageError("max_context = " + std::to_string(max_context_) + " is out of range [1, 16777216]");
  if (options.threads < 1) throw UsageError("threads must be >= 1");
  threads_per_rank_ = std::max(1, options.threads / static_cast<int>(L));
  if (bf16_activations_ && layout_.dtype != DType::BF16)
    throw UsageError("activations='bf16' needs bf16 weights; this model's are " + std::string(dtype_name(layout_.dtype)));
  kernels_ = select_kernels(std::getenv("QWEN3PACK_ISA"));

  files_.reserve(static_cast<size_t>(L));
  weights_.reserve(static_cast<size_t>(L));
  for (int64_t i = 0; i < L; ++i) {
    const RankSource& src = ranks[static_cast<size_t>(i)];
    const int64_t r = first + i;
    if (src.expect.rank != r || src.expect.world_size != W)
      throw FormatError(src.path + ": listed as rank " + std::to_string(src.expect.rank) + " of " +
                        std::to_string(src.expect.world_size) + " where rank " + std::to_string(r) +
                        " of a world of " + std::to_string(W) + " is held");
    files_.emplace_back(src.path);
    const RankPrefix prefix = check_prefix(files_.back(), src.expect);
    weights_.push_back(bind_rank_weights(files_.back(), prefix.data_offset, src.tensors, model_, layout_,
                                         options.verify_crc));
  }

  kv_geometry_.world_size = static_cast<int>(L);  // the caches hold this process's ranks
  kv_geometry_.layers = model_.num_hidden_layers;
  kv_geometry_.sliding = model_.sliding;
  kv_geometry_.window = model_.sliding_window;
  kv_geometry_.max_context = max_context_;
  kv_geometry_.heads = layout_.kv_heads_per_rank;
  kv_geometry_.head_dim = model_.head_dim;
  if (options.kv_dtype != DType::F32 && options.kv_dtype != DType::BF16)
    throw UsageError(std::string("kv_dtype = ") + dtype_name(options.kv_dtype) + " is not supported (f32 or bf16)");
  kv_geometry_.dtype = options.kv_dtype;
  rope_ = compute_rope(model_);
  attn_scale_ = static_cast<float>(std::pow(static_cast<double>(model_.head_dim), -0.5));

  comm_ = std::move(comm);
  rank_pool_ = std::make_unique<ThreadPool>(static_cast<int>(L));
  for (int64_t i = 0; i < L; ++i) pools_.push_back(std::make_unique<ThreadPool>(threads_per_rank_));
  work_.resize(static_cast<size_t>(L));
}

Engine::~Engine() { close(); }

bool Engine::forked() const { return forks_as_child.load() != forks_at_creation_; }

void Engine::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_.exchange(true)) return;
  pools_.clear();
  rank_pool_.reset();
  weights_.clear();
  for (MappedFile& f : files_) f.unmap();
  files_.clear();
  work_.clear();
  gathered_ = {};
  kv_pool_.close();
}

std::unique_ptr<KVCache> Engine::new_cache() {
  if (closed_) throw ClosedError("the model is closed");
  return std::make_unique<KVCache>(&kv_geometry_, &kv_pool_, id_);
}

std::unique_ptr<KVCache> Engine::copy_cache(const KVCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);  // not while a forward writes it
  if (closed_) throw ClosedError("the model is closed");
  return std::make_unique<KVCache>(cache);
}

void Engine::reset_cache(KVCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);
  cache.reset();
}

void Engine::truncate_cache(KVCache& cache, int64_t length) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t position = cache.position();
  if (length < 0 || length > position)
    throw UsageError("cannot truncate a sequence of " + std::to_string(position) + " tokens to " +
                     std::to_string(length));
  // Position p of a ring of r slots lives in slot p % r: once the sequence has passed r, writing
  // positions [length, position) again would need keys that later positions overwrote.
  for (int64_t layer = 0; layer < kv_geometry_.layers; ++layer) {
    const int64_t ring = cache.ring(layer);
    if (ring && position > ring && 0 < length && length < position - 1)
      throw UsageError("cannot truncate a sequence of " + std::to_string(position) + " tokens to " +
                       std::to_string(length) + ": its sliding-window layers have moved past them");
  }
  cache.set_position(length);
}

void Engine::check_request(const std::vector<ForwardRequest>& batch) {
  if (closed_) throw ClosedError("the model is closed");
  if (batch.empty()) throw UsageError("empty batch");
  std::set<const KVCache*> caches;
  for (size_t i = 0; i < batch.size(); ++i) {
    const ForwardRequest& q = batch[i];
    const std::string which = batch.size() > 1 ? "sequence " + std::to_string(i) + ": " : "";
    if (!q.cache || q.cache->owner() != id_) throw UsageError(which + "session belongs to another model");
    if (!caches.insert(q.cache).second) throw UsageError(which + "the same session appears twice in one batch");
    if (q.n == 0) throw UsageError(which + "no tokens given");
    for (size_t j = 0; j < q.n; ++j)
      if (q.ids[j] < 0 || q.ids[j] >= model_.vocab_size)
        throw UsageError(which + "token id " + std::to_string(q.ids[j]) + " at index " + std::to_string(j) +
                         " is outside the vocabulary [0, " + std::to_string(model_.vocab_size) + ")");
    const int64_t end = q.cache->position() + static_cast<int64_t>(q.n);
    if (end > max_context_)
      throw ContextLengthError(which + "the sequence would reach " + std::to_string(end) +
                               " tokens, beyond max_context = " + std::to_string(max_context_) +
                               " (it holds " + std::to_string(q.cache->position()) + ", " +
                               std::to_string(q.n) + " more were given)");
  }
}

void Engine::check(const std::vector<ForwardRequest>& batch) {
  std::lock_guard<std::mutex> lock(mu_);
  check_request(batch);
}

std::vector<float> Engine::forward(const std::vector<ForwardRequest>& batch) {
  std::lock_guard<std::mutex> lock(mu_);
  check_request(batch);

  // Flatten the batch (every allocation happens here, before the ranks start).
  const size_t W = static_cast<size_t>(layout_.world_size), L = static_cast<size_t>(local_ranks());
  const bool holds_logits = first_rank() == 0;
  const size_t H = static_cast<size_t>(model_.hidden_size), D = static_cast<size_t>(model_.head_dim);
  const size_t half = D / 2;
  seqs_.clear();
  tok_ids_.clear();
  tok_pos_.clear();
  tok_seq_.clear();
  selected_.clear();
  for (const ForwardRequest& q : batch) {
    const int64_t pos0 = q.cache->position();
    q.cache->reserve(pos0 + static_cast<int64_t>(q.n));
    seqs_.push_back({q.cache, tok_ids_.size(), q.n, pos0});
    for (size_t j = 0; j < q.n; ++j) {
      if (q.all_logits || j + 1 == q.n) selected_.push_back(tok_ids_.size());
      tok_ids_.push_back(q.ids[j]);
      tok_pos_.push_back(pos0 + static_cast<int64_t>(j));
      tok_seq_.push_back(static_cast<uint32_t>(seqs_.size() - 1));
    }
  }
  const size_t N = tok_ids_.size(), S = selected_.size();
  // Attention schedule (see attention()): a sequence wraps the ring of the sliding layers when
  // several new tokens run past the ring's end.
  bulk_full_.resize(N);
  for (size_t t = 0; t < N; ++t) bulk_full_[t] = t;
  query_blocks_.clear();
  for (const Seq& s : seqs_)
    for (size_t j = 0; j < s.n; j += kQueryBlock)
      query_blocks_.push_back({s.cache, s.first_token + j, std::min(kQueryBlock, s.n - j), s.pos0 + static_cast<int64_t>(j)});
  bulk_sliding_.clear();
  wrapping_seqs_.clear();
  const int64_t ring = std::min(model_.sliding_window, max_context_);
  for (size_t i = 0; i < seqs_.size(); ++i) {
    const Seq& s = seqs_[i];
    if (ring > 0 && s.n > 1 && s.pos0 + static_cast<int64_t>(s.n) > ring)
      wrapping_seqs_.push_back(i);
    else
      for (size_t j = 0; j < s.n; ++j) bulk_sliding_.push_back(s.first_token + j);
  }
  cos_.resize(N * half);
  sin_.resize(N * half);
  for (size_t t = 0; t < N; ++t) {
    const float p = static_cast<float>(tok_pos_[t]);
    for (size_t i = 0; i < half; ++i) {
      const float angle = p * rope_.inv_freq[i];  // float32, as transformers
      cos_[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle))) * rope_.attention_factor;
      sin_[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle))) * rope_.attention_factor;
    }
  }
  const size_t Nq = static_cast<size_t>(layout_.heads_per_rank), Nkv = static_cast<size_t>(layout_.kv_heads_per_rank);
  const size_t I = static_cast<size_t>(layout_.intermediate_per_rank), V = static_cast<size_t>(layout_.vocab_rows_per_rank);
  const size_t T = static_cast<size_t>(threads_per_rank_);
  for (RankWork& w : work_) {
    w.x.resize(N * H);
    w.xn.resize(N * H);
    w.qkv.resize(N * (Nq + 2 * Nkv) * D);
    w.attn.resize(N * Nq * D);
    w.proj.resize(N * H);
    w.gate_up.resize(N * 2 * I);
    w.act.resize(N * I);
    w.sel.resize(S * H);
    w.logits.resize(S * V);
    w.softmax_state.resize(T * 2 * (Nq / Nkv));
    w.query_block.resize(T * kQueryBlock * (Nq / Nkv) * (2 * D + 2));
    if (layout_.stores(DType::Q8)) w.xq.resize(N * q8_blocks(std::max({H, Nq * D, I})));
    if (layout_.stores(DType::Q4)) w.xq4.resize(N * q4_blocks(std::max({H, Nq * D, I})));
    if (layout_.stores(DType::Q6)) w.xq6.resize(N * q4_blocks(std::max({H, Nq * D, I})));
    if (bf16_activations_) w.x_bf16.resize(N * std::max({H, Nq * D, I}));
  }
  if (holds_logits) gathered_.resize(W * S * V);
  comm_->reserve(std::max(N * H, S * V));

  rank_pool_->run(static_cast<int>(L), [&](int r) { rank_forward(r); });
  check_files_intact();
  if (!holds_logits) {
    for (const Seq& s : seqs_) s.cache->set_position(s.pos0 + static_cast<int64_t>(s.n));
    return {};
  }

  // Logits rows: the vocabulary is split by rows over the ranks; padding rows are dropped.
  const size_t vocab = static_cast<size_t>(model_.vocab_size);
  std::vector<float> out(S * vocab);
  for (size_t s = 0; s < S; ++s)
    for (size_t r = 0; r < W; ++r) {
      const size_t begin = r * V;
      if (begin >= vocab) break;
      const size_t count = std::min(V, vocab - begin);
      std::memcpy(out.data() + s * vocab + begin, gathered_.data() + (r * S + s) * V, count * sizeof(float));
    }
  check_finite(out);
  for (const Seq& s : seqs_) s.cache->set_position(s.pos0 + static_cast<int64_t>(s.n));
  return out;
}

// A rank file truncated under the mapping read as zeros where pages were lost: the logits are
// wrong, and every later forward would be too.
void Engine::check_files_intact() const {
  for (const MappedFile& f : files_)
    if (f.damaged())
      throw FormatError(f.path() + ": the file was truncated while the model was loaded (its lost pages read as "
                        "zeros); load the model again from intact files");
}

// NaN or Inf logits would sample token 0 forever: stop instead (the caches are not advanced).
void Engine::check_finite(const std::vector<float>& logits) const {
  for (size_t i = 0; i < logits.size(); ++i)
    if (!std::isfinite(logits[i]))
      throw NumericalError("the logits are not finite (" + std::to_string(logits[i]) + " for token " +
                           std::to_string(i % static_cast<size_t>(model_.vocab_size)) +
                           "): the model's weights hold NaN or Inf values, or its activations overflowed");
}

namespace {
// Rows per chunk of a matrix product: about 8 chunks per thread (a slow thread holds the others
// up by one chunk at most), a multiple of 12 so that the kernels' row tiles (6, 2 or 1 rows) fill each.
size_t matmul_chunk_rows(size_t rows, size_t threads) {
  constexpr size_t kAlign = 12, kChunksPerThread = 8;
  const size_t per = (rows + threads * kChunksPerThread - 1) / (threads * kChunksPerThread);
  return std::max(kAlign, (per + kAlign - 1) / kAlign * kAlign);
}

// compute(o0, o1) over the rows [0, rows) of a matrix product, in chunks of contiguous rows: each
// thread goes through its own share of them in address order, then takes what is left of the
// others' (ThreadPool::run_chunks), so that a thread that was descheduled, or streams slower,
// leaves its last chunks to the others instead of holding them at the join. Each row's value is
// the same whichever thread computes it (kernels.h, quant.h).
template <class Compute>
void for_row_chunks(ThreadPool& pool, size_t rows, const Compute& compute) {
  if (pool.size() == 1) return compute(size_t(0), rows);
  pool.run_chunks(rows, matmul_chunk_rows(rows, static_cast<size_t>(pool.size())), compute);
}

// A product on quantized weights (Args: MatmulQ8Args, MatmulQ4Args or MatmulQ6Args, quant.h): the activations
// are quantized once, a block row per token (a small cost next to the product: n * in values
// against in * out weights), then the threads compute chunks of rows with integer dot products.
template <class Args, class Activations, class Quantize, class Kernel>
void quantized_matmul(ThreadPool& pool, const MatmulArgs& a, Activations* xq, size_t blocks, Quantize quantize,
                      Kernel kernel) {
  parallel_for(pool, a.n, [&](int, size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) quantize(a.x + t * a.in, a.in, xq + t * blocks);
  });
  Args q;
  q.x = xq;
  q.n = a.n;
  q.in = a.in;
  q.out = a.out;
  q.w = static_cast<decltype(q.w)>(a.w);
  q.y = a.y;
  for_row_chunks(pool, a.out, [&](size_t o0, size_t o1) { kernel(q, o0, o1); });
}
}  // namespace

void Engine::matmul(int rank, const float* x, size_t n, const TensorView& w, float* y) {
  ThreadPool& pool = *pools_[static_cast<size_t>(rank)];
  MatmulArgs a;
  a.x = x;
  a.n = n;
  a.in = static_cast<size_t>(w.cols);
  a.out = static_cast<size_t>(w.rows);
  a.w = w.data;
  a.dt = w.dtype;
  a.y = y;
  RankWork& work = work_[static_cast<size_t>(rank)];
  if (w.dtype == DType::Q8)
    return quantized_matmul<MatmulQ8Args>(pool, a, work.xq.data(), q8_blocks(a.in), quantize_row_q8, kernels_.matmul_q8);
  if (w.dtype == DType::Q4)  // activations in blocks of 256 (quant.h)
    return quantized_matmul<MatmulQ4Args>(pool, a, work.xq4.data(), q4_blocks(a.in), quantize_row_q8k, kernels_.matmul_q4);
  if (w.dtype == DType::Q6)  // activations in blocks of 256, with sums of 16 (quant.h)
    return quantized_matmul<MatmulQ6Args>(pool, a, work.xq6.data(), q4_blocks(a.in), quantize_row_q8k16, kernels_.matmul_q6);
  if (bf16_activations_ && w.dtype == DType::BF16) {  // rounded once here, for all the threads' rows
    uint16_t* x_bf16 = work.x_bf16.data();
    parallel_for(pool, n, [&](int, size_t b, size_t e) { to_bf16(x + b * a.in, x_bf16 + b * a.in, (e - b) * a.in); });
    a.x_bf16 = x_bf16;
  }
  for_row_chunks(pool, a.out, [&](size_t o0, size_t o1) { kernels_.matmul(a, o0, o1); });
}

void Engine::rank_forward(int rank) {
  RankWork& w = work_[static_cast<size_t>(rank)];
  const RankWeights& wt = weights_[static_cast<size_t>(rank)];
  ThreadPool& pool = *pools_[static_cast<size_t>(rank)];
  const size_t N = tok_ids_.size(), S = selected_.size();
  const size_t H = static_cast<size_t>(model_.hidden_size), D = static_cast<size_t>(model_.head_dim);
  const size_t half = D / 2;
  const size_t Nq = static_cast<size_t>(layout_.heads_per_rank), Nkv = static_cast<size_t>(layout_.kv_heads_per_rank);
  const size_t I = static_cast<size_t>(layout_.intermediate_per_rank), V = static_cast<size_t>(layout_.vocab_rows_per_rank);
  const size_t qkv_row = (Nq + 2 * Nkv) * D;
  const float eps = static_cast<float>(model_.rms_norm_eps);

  // Embedding: rank g holds vocabulary rows [g * V, (g + 1) * V) (g = first_rank() + rank); the others are zero
  // here, and the all-reduce assembles every token's row (adding exact zeros).
  const int64_t first_row = static_cast<int64_t>(first_rank() + rank) * static_cast<int64_t>(V);
  const size_t embed_row = row_bytes(wt.embed.dtype, H);  // a q8, q4 or q6 row is dequantized on lookup
  parallel_for(pool, N, [&](int, size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const int64_t local = tok_ids_[t] - first_row;
      if (local >= 0 && local < static_cast<int64_t>(V))
        to_f32(static_cast<const uint8_t*>(wt.embed.data) + static_cast<size_t>(local) * embed_row, wt.embed.dtype,
               w.x.data() + t * H, H);
      else
        std::fill_n(w.x.data() + t * H, H, 0.0f);
    }
  });
  comm_->all_reduce_sum(rank, w.x.data(), N * H);

  for (int64_t l = 0; l < model_.num_hidden_layers; ++l) {
    const LayerWeights& L = wt.layers[static_cast<size_t>(l)];
    // Attention block.
    parallel_for(pool, N, [&](int, size_t b, size_t e) {
      for (size_t t = b; t < e; ++t) rmsnorm(w.x.data() + t * H, L.input_norm.f32(), eps, w.xn.data() + t * H, H);
    });
    matmul(rank, w.xn.data(), N, L.qkv, w.qkv.data());
    parallel_for(pool, N, [&](int, size_t b, size_t e) {
      for (size_t t = b; t < e; ++t) {
        float* row = w.qkv.data() + t * qkv_row;
        const float* c = cos_.data() + t * half;
        const float* s = sin_.data() + t * half;
        for (size_t h = 0; h < Nq; ++h) {
          rmsnorm(row + h * D, L.q_norm.f32(), eps, row + h * D, D);
          rope_neox(row + h * D, c, s, D);
          if (bf16_attention()) round_to_bf16(row + h * D, D);  // the scores' activations
        }
        for (size_t g = 0; g < Nkv; ++g) {
          float* k = row + (Nq + g) * D;
          rmsnorm(k, L.k_norm.f32(), eps, k, D);
          rope_neox(k, c, s, D);
        }
      }
    });
    attention(rank, l);
    matmul(rank, w.attn.data(), N, L.o_proj, w.proj.data());
    comm_->all_reduce_sum(rank, w.proj.data(), N * H);
    add(w.x.data(), w.proj.data(), N * H);
    // MLP block.
    parallel_for(pool, N, [&](int, size_t b, size_t e) {
      for (size_t t = b; t < e; ++t) rmsnorm(w.x.data() + t * H, L.post_norm.f32(), eps, w.xn.data() + t * H, H);
    });
    matmul(rank, w.xn.data(), N, L.gate_up, w.gate_up.data());
    parallel_for(pool, N, [&](int, size_t b, size_t e) {
      for (size_t t = b; t < e; ++t) {
        const float* gu = w.gate_up.data() + t * 2 * I;
        silu_mul(gu, gu + I, w.act.data() + t * I, I);
      }
    });
    matmul(rank, w.act.data(), N, L.down, w.proj.data());
    comm_->all_reduce_sum(rank, w.proj.data(), N * H);
    add(w.x.data(), w.proj.data(), N * H);
  }

  // Final norm and this rank's vocabulary rows of the logits, gathered on rank 0.
  for (size_t s = 0; s < S; ++s)
    rmsnorm(w.x.data() + selected_[s] * H, wt.final_norm.f32(), eps, w.sel.data() + s * H, H);
  matmul(rank, w.sel.data(), S, wt.lm_head, w.logits.data());
  comm_->gather(rank, w.logits.data(), S * V, gathered_.data());
}

void Engine::store_kv(int rank, int64_t layer, KVCache& cache, size_t t, int64_t pos, int64_t g0, int64_t g1) {
  const size_t D = static_cast<size_t>(model_.head_dim);
  const size_t Nq = static_cast<size_t>(layout_.heads_per_rank), Nkv = static_cast<size_t>(layout_.kv_heads_per_rank);
  const float* row = work_[static_cast<size_t>(rank)].qkv.data() + t * (Nq + 2 * Nkv) * D;
  const int64_t slot = cache.slot(layer, pos);
  for (int64_t h = g0; h < g1; ++h) {
    const float* k = row + (Nq + static_cast<size_t>(h)) * D;
    const float* v = row + (Nq + Nkv + static_cast<size_t>(h)) * D;
    if (cache.dtype() == DType::BF16) {
      to_bf16(k, static_cast<uint16_t*>(cache.keys(rank, layer, h, slot)), D);
      to_bf16(v, static_cast<uint16_t*>(cache.values(rank, layer, h, slot)), D);
    } else {
      std::memcpy(cache.keys(rank, layer, h, slot), k, D * sizeof(float));
      std::memcpy(cache.values(rank, layer, h, slot), v, D * sizeof(float));
    }
  }
}

static_assert(kKVBlock % static_cast<int64_t>(kAttentionTile) == 0, "a tile of attention must lie in one block of the KV cache");

// The queries of token t (at position pos) in the local heads that share KV head g, against the
// cached keys they may see, positions [lo, pos]: only those tiles are visited (none is masked),
// each read once for all the heads of the group. Tiles end at multiples of kAttentionTile and,
// in a sliding layer, where the ring wraps: both are fixed by absolute positions, so the order of
// the sums is the same whatever else the batch holds. `state` holds 2 G floats.
void Engine::attend(int rank, int64_t layer, KVCache& cache, size_t t, int64_t pos, int64_t g, float* state) {
  const size_t D = static_cast<size_t>(model_.head_dim);
  const size_t Nq = static_cast<size_t>(layout_.heads_per_rank), Nkv = static_cast<size_t>(layout_.kv_heads_per_rank);
  const size_t G = Nq / Nkv;
  RankWork& w = work_[static_cast<size_t>(rank)];
  const bool sliding = model_.sliding[static_cast<size_t>(layer)];
  const int64_t lo = sliding ? std::max<int64_t>(0, pos - model_.sliding_window + 1) : 0;
  const int64_t ring = cache.ring(layer);
  const int64_t tile = static_cast<int64_t>(kAttentionTile);

  AttentionTile a;
  a.q = w.qkv.data() + t * (Nq + 2 * Nkv) * D + static_cast<size_t>(g) * G * D;
  a.G = G;
  a.D = D;
  a.ld = D;
  a.kv = cache.dtype();
  a.scale = attn_scale_;
  a.bf16_products = bf16_attention();
  a.max = state;
  a.sum = state + G;
  a.out = w.attn.data() + t * Nq * D + static_cast<size_t>(g) * G * D;
  std::fill_n(a.max, G, -INFINITY);
  std::fill_n(a.sum, G, 0.0f);
  std::fill_n(a.out, G * D, 0.0f);
  for (int64_t p = lo; p <= pos;) {
    const int64_t slot = cache.slot(layer, p);
    int64_t end = std::min(pos + 1, (p / tile + 1) * tile);
    if (ring) end = std::min(end, p - slot + ring);  // the ring wraps there
    a.k = cache.keys(rank, layer, g, slot);
    a.v = cache.values(rank, layer, g, slot);
    a.nk = static_cast<size_t>(end - p);
    kernels_.attention_tile(a);
    p = end;
  }
  for (size_t h = 0; h < G; ++h) scale(a.out + h * D, 1.0f / a.sum[h], D);
}

// The queries of a block of consecutive tokens of a sequence (positions pos0, pos0 + 1, ...) in
// the local heads that share KV head g, in a full-attention layer: the tiles that every token of
// the block sees whole are read once for the block, as one tile of n G heads; then each token
// goes on alone through the rest of its tiles. Each head's sums are those of attend(): the same
// tiles in the same order (a head's state never depends on the others of a tile), so the bits do
// not depend on how tokens fall into blocks. `scratch` holds n G (2 D + 2) floats.
void Engine::attend_block(int rank, int64_t layer, const QueryBlock& block, int64_t g, float* scratch) {
  const size_t D = static_cast<size_t>(model_.head_dim);
  const size_t Nq = static_cast<size_t>(layout_.heads_per_rank), Nkv = static_cast<size_t>(layout_.kv_heads_per_rank);
  const size_t G = Nq / Nkv, heads = block.n * G;
  RankWork& w = work_[static_cast<size_t>(rank)];
  KVCache& cache = *block.cache;
  const int64_t tile = static_cast<int64_t>(kAttentionTile);

  AttentionTile a;
  a.q = scratch;
  a.G = heads;
  a.D = D;
  a.ld = D;
  a.kv = cache.dtype();
  a.scale = attn_scale_;
  a.bf16_products = bf16_attention();
  a.out = scratch + heads * D;
  a.max = a.out + heads * D;
  a.sum = a.max + heads;
  for (size_t j = 0; j < block.n; ++j)
    std::memcpy(scratch + j * G * D, w.qkv.data() + (block.first_token + j) * (Nq + 2 * Nkv) * D + static_cast<size_t>(g) * G * D,
                G * D * sizeof(float));
  std::fill_n(a.max, heads, -INFINITY);
  std::fill_n(a.sum, heads, 0.0f);
  std::fill_n(a.out, heads * D, 0.0f);
  const int64_t shared_end = (block.pos0 + 1) / tile * tile;  // the whole tiles the first token sees
  for (int64_t p = 0; p < shared_end; p += tile) {
    a.k = cache.keys(rank, layer, g, cache.slot(layer, p));
    a.v = cache.values(rank, layer, g, cache.slot(layer, p));
    a.nk = static_cast<size_t>(tile);
    kernels_.attention_tile(a);
  }
  for (size_t j = 0; j < block.n; ++j) {
    AttentionTile one = a;
    one.q = a.q + j * G * D;
    one.G = G;
    one.out = a.out + j * G * D;
    one.max = a.max + j * G;
    one.sum = a.sum + j * G;
    const int64_t pos = block.pos0 + static_cast<int64_t>(j);
    for (int64_t p = shared_end; p <= pos;) {
      const int64_t end = std::min(pos + 1, (p / tile + 1) * tile);
      one.k = cache.keys(rank, layer, g, cache.slot(layer, p));
      one.v = cache.values(rank, layer, g, cache.slot(layer, p));
      one.nk = static_cast<size_t>(end - p);
      kernels_.attention_tile(one);
      p = end;
    }
    float* out = w.attn.data() + (block.first_token + j) * Nq * D + static_cast<size_t>(g) * G * D;
    std::memcpy(out, one.out, G * D * sizeof(float));
    for (size_t h = 0; h < G; ++h) scale(out + h * D, 1.0f / one.sum[h], D);
  }
}

void Engine::attention(int rank, int64_t layer) {
  RankWork& w = work_[static_cast<size_t>(rank)];
  ThreadPool& pool = *pools_[static_cast<size_t>(rank)];
  const int64_t Nkv = layout_.kv_heads_per_rank;
  const size_t per_thread = w.softmax_state.size() / static_cast<size_t>(threads_per_rank_);

  // See forward(): sequences whose new tokens do not wrap a ring write all their keys first,
  // then all their queries attend in parallel.
  const bool sliding = model_.sliding[static_cast<size_t>(layer)];
  const std::vector<size_t>& bulk_tokens = sliding ? bulk_sliding_ : bulk_full_;
  parallel_for(pool, bulk_tokens.size(), [&](int, size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const size_t t = bulk_tokens[i];
      store_kv(rank, layer, *seqs_[tok_seq_[t]].cache, t, tok_pos_[t], 0, Nkv);
    }
  });
  // Pairs (token or query block, KV head), dealt to the threads in turn rather than in contiguous
  // ranges: a token's cost grows with its position, and contiguous ranges of a prompt gave the
  // last thread 3/4 of the work with 2 threads.
  if (!sliding) {
    const size_t pairs = query_blocks_.size() * static_cast<size_t>(Nkv);
    const size_t parts = std::min(static_cast<size_t>(pool.size()), pairs);
    const size_t scratch = w.query_block.size() / static_cast<size_t>(threads_per_rank_);
    pool.run(static_cast<int>(parts), [&](int part) {
      for (size_t i = static_cast<size_t>(part); i < pairs; i += parts)
        attend_block(rank, layer, query_blocks_[i / static_cast<size_t>(Nkv)], static_cast<int64_t>(i % static_cast<size_t>(Nkv)),
                     w.query_block.data() + static_cast<size_t>(part) * scratch);
    });
    return;
  }
  const size_t pairs = bulk_tokens.size() * static_cast<size_t>(Nkv);
  const size_t parts = std::min(static_cast<size_t>(pool.size()), pairs);
  pool.run(static_cast<int>(parts), [&](int part) {
    float* state = w.softmax_state.data() + static_cast<size_t>(part) * per_thread;
    for (size_t i = static_cast<size_t>(part); i < pairs; i += parts) {
      const size_t t = bulk_tokens[i / static_cast<size_t>(Nkv)];
      attend(rank, layer, *seqs_[tok_seq_[t]].cache, t, tok_pos_[t], static_cast<int64_t>(i % static_cast<size_t>(Nkv)), state);
    }
  });

  // A sequence whose new tokens wrap the ring of a sliding layer writes and attends token by
  // token, or a later token's key would overwrite one that an earlier token needs. Its KV heads
  // go in parallel: each task touches only the slots' part of its own heads.
  for (size_t si : wrapping_seqs_) {
    const Seq& s = seqs_[si];
    parallel_for(pool, static_cast<size_t>(Nkv), [&](int part, size_t b, size_t e) {
      float* state = w.softmax_state.data() + static_cast<size_t>(part) * per_thread;
      for (size_t j = 0; j < s.n; ++j) {
        const size_t t = s.first_token + j;
        const int64_t pos = s.pos0 + static_cast<int64_t>(j);
        store_kv(rank, layer, *s.cache, t, pos, static_cast<int64_t>(b), static_cast<int64_t>(e));
        for (size_t g = b; g < e; ++g) attend(rank, layer, *s.cache, t, pos, static_cast<int64_t>(g), state);
      }
    });
  }
}

}  // namespace q3p
