// The Qwen3 forward pass over tensor-parallel ranks: one thread per rank (each with its own pool
// for its matmuls), weights read straight from the read-only mappings, collectives through a
// Communicator. One forward serves a batch of sequences at different positions: all their new
// tokens form one activation matrix, so each weight is read once per step for the whole batch.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "comm.h"
#include "kernels.h"
#include "kv_cache.h"
#include "mapped_file.h"
#include "model_config.h"
#include "quant.h"
#include "thread_pool.h"
#include "weights.h"

namespace q3p {

// Tokens of a sequence that attend together in full-attention layers (Engine::attend_block): each
// key tile is read once per block instead of once per token.
constexpr size_t kQueryBlock = 8;

// What the caller knows about one rank file (from the manifest and the file's own header).
struct RankSource {
  std::string path;
  ExpectedPrefix expect;
  std::vector<TensorRecord> tensors;
};

struct EngineOptions {
  int threads = 1;            // compute threads in all; each rank gets max(1, threads / W)
  int64_t max_context = 4096;  // longest sequence (KV cache positions)
  bool verify_crc = false;     // check every tensor's CRC32C at load
  DType kv_dtype = DType::F32;  // of the KV cache: F32 or BF16 (half the memory)
  // Every matrix product's input rounded to bf16 (bf16 weights only): vdpbf16ps where the CPU
  // has it, about twice the f32 FMA rate in prefill; the logits move within the bound README states.
  bool bf16_activations = false;
};

// New tokens of one sequence for Engine::forward.
struct ForwardRequest {
  KVCache* cache = nullptr;
  const int32_t* ids = nullptr;
  size_t n = 0;
  bool all_logits = false;  // logits of every new token, else of the last one only
};

class Engine {
 public:
  // Maps and checks the rank files of this process, `ranks`: all of them, computed by threads
  // exchanging through shared memory (comm null), or the ranks of `comm` held here (an MPI
  // process's share). Throws FormatError (a bad file or table) or UsageError.
  Engine(const ModelConfig& model, const Layout& layout, const std::vector<RankSource>& ranks,
         const EngineOptions& options, std::unique_ptr<Communicator> comm = nullptr);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& model() const { return model_; }
  const Layout& layout() const { return layout_; }
  int64_t max_context() const { return max_context_; }
  int threads() const { return threads_per_rank_ * local_ranks(); }
  int threads_per_rank() const { return threads_per_rank_; }
  // The ranks this process holds: [first_rank(), first_rank() + local_ranks()).
  int first_rank() const { return comm_->first_rank(); }
  int local_ranks() const { return comm_->local_ranks(); }
  // The instruction set of the matrix kernels (QWEN3PACK_ISA at construction, else the best).
  const char* isa() const { return isa_name(kernels_.isa); }
  DType kv_dtype() const { return kv_geometry_.dtype; }
  bool closed() const { return closed_.load(); }
  bool bf16_activations() const { return bf16_activations_; }
  // Attention in bf16 activations' precision (AttentionTile::bf16_products): bf16 activations and cache.
  bool bf16_attention() const { return bf16_activations_ && kv_geometry_.dtype == DType::BF16; }
  // True in a child forked after the engine was made: its threads and locks are the parent's,
  // so the child must neither use it nor destroy it (see bindings.cpp).
  bool forked() const;
  // Unmaps the files and stops the threads; later calls throw ClosedError. Idempotent.
  void close();

  std::unique_ptr<KVCache> new_cache();
  std::unique_ptr<KVCache> copy_cache(const KVCache& cache);
  void reset_cache(KVCache& cache);
  // Keeps the first `length` positions of the sequence. Throws UsageError past its position, or
  // where a sliding layer's ring has already overwritten keys that position `length` would see.
  void truncate_cache(KVCache& cache, int64_t length);

  // Runs the new tokens of every request through the model and advances their caches.
  // Returns the logits, vocab_size floats per row: for each request in order, one row per new
  // token (all_logits) or one row (its last token); nothing in a process without rank 0, where
  // every process must call forward with the same batch. Throws (before any compute) UsageError for
  // a bad request, ContextLengthError past max_context, ClosedError after close(); and
  // after the compute, FormatError when a rank file was truncated under the mapping and
  // NumericalError when the logits are not finite.
  std::vector<float> forward(const std::vector<ForwardRequest>& batch);
  // Throws what forward would throw before any compute, and computes nothing: an MPI process 0
  // checks a step before it sends it to the others.
  void check(const std::vector<ForwardRequest>& batch);

 private:
  struct RankWork {
    AlignedVector<float> x, xn, qkv, attn, proj, gate_up, act, sel, logits;
    AlignedVector<float> softmax_state;  // per pool thread: the running max and sum of G query heads
    AlignedVector<float> query_block;    // per pool thread: a query block's queries, outputs and softmax state
    AlignedVector<BlockQ8Act> xq;  // the activations of a product on q8 weights, quantized
    AlignedVector<BlockQ8K> xq4;  // and on q4 weights
    AlignedVector<BlockQ8K16> xq6;  // and on q6 weights
    AlignedVector<uint16_t> x_bf16;  // a matrix product's input rounded to bf16 (bf16_activations)
  };
  struct QueryBlock {  // up to kQueryBlock consecutive tokens of one sequence (attend_block)
    KVCache* cache;
    size_t first_token, n;
    int64_t pos0;
  };
  struct Seq {  // one request during a forward
    KVCache* cache;
    size_t first_token, n;
    int64_t pos0;
  };

  void check_request(const std::vector<ForwardRequest>& batch);
  void check_files_intact() const;
  void check_finite(const std::vector<float>& logits) const;
  // `rank` in the functions below indexes this process's ranks (0 is first_rank()).
  void rank_forward(int rank);
  void matmul(int rank, const float* x, size_t n, const TensorView& w, float* y);
  void attention(int rank, int64_t layer);
  void attend(int rank, int64_t layer, KVCache& cache, size_t t, int64_t pos, int64_t kv_head, float* state);
  void attend_block(int rank, int64_t layer, const QueryBlock& block, int64_t kv_head, float* scratch);
  void store_kv(int rank, int64_t layer, KVCache& cache, size_t t, int64_t pos, int64_t kv_begin, int64_t kv_end);

  ModelConfig model_;
  Layout layout_;
  int64_t max_context_;
  int threads_per_rank_;
  bool bf16_activations_;
  uint64_t id_;
  uint64_t forks_at_creation_ = 0;
  KVGeometry kv_geometry_;
  KVBlockPool kv_pool_;
  RopeTables rope_;
  float attn_scale_;
  Kernels kernels_;

  std::vector<MappedFile> files_;
  std::vector<RankWeights> weights_;
  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<ThreadPool> rank_pool_;
  std::vector<std::unique_ptr<ThreadPool>> pools_;
  std::vector<RankWork> work_;

  // The current forward: tokens of all sequences, flattened.
  std::vector<Seq> seqs_;
  std::vector<int32_t> tok_ids_;
  std::vector<int64_t> tok_pos_;
  std::vector<uint32_t> tok_seq_;
  std::vector<float> cos_, sin_;     // [token][head_dim / 2]
  std::vector<size_t> selected_;     // tokens whose logits are wanted
  std::vector<size_t> bulk_full_, bulk_sliding_;  // tokens attended all at once, per layer kind
  std::vector<QueryBlock> query_blocks_;          // bulk_full_ in blocks (full-attention layers)
  std::vector<size_t> wrapping_seqs_;  // sequences attended token by token in sliding layers
  std::vector<float> gathered_;      // [rank][selected][vocab rows per rank]

  std::mutex mu_;  // one forward (or close, or cache copy) at a time
  std::atomic<bool> closed_{false};
};

}  // namespace q3p
