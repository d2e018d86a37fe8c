// gradcent's native CPU kernels: GC and the optimizer update in one pass.
//
// One call updates a whole list of float32 CPU parameters. The work is cut into
// items of whole rows (a row is one GC unit: the weights of one output channel
// or neuron), spread over ATen's intra-op threads. For each row the kernel
// first sums ĝ = s·g + λw over the row (the unit's mean), then runs the update
// over the same row while it is still in L1/L2: GC adds no pass over memory.
// A tensor with rows == 0 is not centred (biases, norms): its elements are cut
// into plain chunks and only updated.
//
// Each op checks every parameter (float32, CPU, dense, gradient and state laid
// out like it, whole rows contiguous, rows >= 0) and returns the indices of the
// ones it did not take, untouched, for the caller's slower path.
//
// The math is torch's (FusedAdamKernel.cpp, FusedSGDKernel.cpp) with the
// paper's rule for coupled weight decay: ĝ = P(g + λw) (Yong et al., ECCV 2020,
// §3.4), s = -1 when maximizing.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (64 KiB per stream)

struct Item {
  int64_t tensor;
  int64_t begin;  // first element
  int64_t end;    // one past the last element
  int64_t row;    // row length M when centred, 0 when not
};

// Work items of whole rows (centred) or plain chunks (not centred), taken tensors only.
std::vector<Item> items_of(at::TensorList params, at::IntArrayRef rows,
                           const std::vector<char>& ok) {
  std::vector<Item> out;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (!ok[t] || n == 0) continue;
    if (rows[t] > 0) {
      const int64_t m = n / rows[t];
      const int64_t per = std::max<int64_t>(1, kChunk / m);
      for (int64_t r = 0; r < rows[t]; r += per) {
        out.push_back({t, r * m, std::min(rows[t], r + per) * m, m});
      }
    } else {
      for (int64_t e = 0; e < n; e += kChunk) {
        out.push_back({t, e, std::min(n, e + kChunk), 0});
      }
    }
  }
  return out;
}

// Runs fn on every item, the items cut into one contiguous run per thread with
// about the same number of elements each (one parallel region, no per-tensor
// barrier; small tensors' items do not unbalance the threads). Items only set
// the granularity of that cut: fn gets each tensor's share of a run whole.
template <typename Fn>
void for_items(const std::vector<Item>& items, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t total = 0;
  for (const Item& it : items) total += it.end - it.begin;
  std::vector<size_t> bounds{0};
  int64_t acc = 0;
  for (size_t k = 0; k < items.size(); ++k) {
    acc += items[k].end - items[k].begin;
    // close run t once it holds its share of the elements
    if (static_cast<int64_t>(bounds.size()) < threads &&
        acc * threads >= total * static_cast<int64_t>(bounds.size())) {
      bounds.push_back(k + 1);
    }
  }
  while (static_cast<int64_t>(bounds.size()) <= threads) bounds.push_back(items.size());
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      // Adjacent items of one tensor in a run are merged back into one, so that
      // walk_rows computes only one standalone first-row mean per tensor and run.
      Item cur{-1, 0, 0, 0};
      for (size_t k = bounds[t]; k < bounds[t + 1]; ++k) {
        const Item& it = items[k];
        if (it.tensor == cur.tensor && it.begin == cur.end && it.row == cur.row) {
          cur.end = it.end;
          continue;
        }
        if (cur.tensor >= 0) fn(cur);
        cur = it;
      }
      if (cur.tensor >= 0) fn(cur);
    }
  });
}

void check_sizes(size_t got, size_t want, const char* what) {
  TORCH_CHECK(got == want, "gradcent native: ", what, " has ", got, " entries for ", want,
              " parameters");
}

bool plain_float(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

// Whether the kernels take parameter p with these companions and this rows value.
bool takes(const at::Tensor& p, std::initializer_list<const at::Tensor*> others, int64_t rows) {
  if (!plain_float(p) || !p.is_non_overlapping_and_dense() || rows < 0) return false;
  for (const at::Tensor* t : others) {
    if (!plain_float(*t) || t->sizes() != p.sizes() || t->strides() != p.strides()) return false;
  }
  if (rows == 0) return true;
  const int64_t n = p.numel();
  return p.dim() >= 2 && p.size(0) == rows && n % rows == 0 && p.stride(0) == n / rows;
}

std::vector<int64_t> skipped_of(const std::vector<char>& ok) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < ok.size(); ++i) {
    if (!ok[i]) out.push_back(static_cast<int64_t>(i));
  }
  return out;
}

// Mean of s·g + l2·w over one row (0 when the row is not centred).
inline float row_mean(const float* g, const float* w, int64_t m, float s, float l2) {
  float acc = 0.f;
  if (l2 != 0.f) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < m; ++j) acc += s * g[j] + l2 * w[j];
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < m; ++j) acc += g[j];
    acc *= s;
  }
  return acc / static_cast<float>(m);
}

// Runs body(j) for j in [0, m) as one SIMD loop. With kSum it also returns
// Σ s·gn[j] + l2·wn[j] (the next row's sum, see walk_rows), else 0.
template <bool kSum, typename Body>
inline float row_loop(int64_t m, const float* gn, const float* wn, float s, float l2,
                      const Body& body) {
  if constexpr (kSum) {
    float next = 0.f;
    if (l2 == 0.f) {  // no decay in ĝ: the next weights are not read early
#pragma omp simd reduction(+ : next)
      for (int64_t j = 0; j < m; ++j) {
        next += gn[j];
        body(j);
      }
      return s * next;
    }
#pragma omp simd reduction(+ : next)
    for (int64_t j = 0; j < m; ++j) {
      next += s * gn[j] + l2 * wn[j];
      body(j);
    }
    return next;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) body(j);
    return 0.f;
  }
}

// Walks one item. Centred rows: the first row's mean up front, then each row's
// update also sums the next row's s·g + l2·w, so the next gradient row streams
// in beside this row's state instead of alone (one read stream alone leaves
// memory bandwidth idle). Plain chunks: one pass, mean 0, no sum.
// row(sum_next, r, m, mean, gn, wn) updates [r, r + m) and returns row_loop's sum.
template <typename Row>
inline void walk_rows(const Item& it, const float* g, const float* w, float s, float l2,
                      const Row& row) {
  if (it.row == 0) {
    row(std::false_type{}, it.begin, it.end - it.begin, 0.f, g, w);
    return;
  }
  const int64_t m = it.row;
  float mean = row_mean(g + it.begin, w + it.begin, m, s, l2);
  for (int64_t r = it.begin; r < it.end; r += m) {
    const int64_t next = r + m < it.end ? r + m : r;  // last row: re-sums itself, unused
    mean = row(std::true_type{}, r, m, mean, g + next, w + next) / static_cast<float>(m);
  }
}

std::vector<int64_t> adam_(at::TensorList params, at::TensorList grads,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList steps,
                           at::IntArrayRef rows, double lr, double beta1, double beta2, double eps,
                           double l2, double shrink, bool amsgrad, bool maximize) {
  const size_t n = params.size();
  check_sizes(grads.size(), n, "grads");
  check_sizes(exp_avgs.size(), n, "exp_avgs");
  check_sizes(exp_avg_sqs.size(), n, "exp_avg_sqs");
  if (amsgrad) check_sizes(max_exp_avg_sqs.size(), n, "max_exp_avg_sqs");
  check_sizes(steps.size(), n, "steps");
  check_sizes(rows.size(), n, "rows");
  std::vector<char> ok(n);
  std::vector<float> step_size(n), inv_bc2_sqrt(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor* mx = amsgrad ? &max_exp_avg_sqs[i] : &exp_avg_sqs[i];
    // torch's fused state: a float32 scalar step per parameter.
    ok[i] = takes(params[i], {&grads[i], &exp_avgs[i], &exp_avg_sqs[i], mx}, rows[i]) &&
            plain_float(steps[i]) && steps[i].numel() == 1;
    if (!ok[i]) continue;
    float* sp = steps[i].data_ptr<float>();
    *sp += 1.f;  // once per step, as torch does
    const double step = *sp;
    step_size[i] = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    inv_bc2_sqrt[i] = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)));
  }
  const auto items = items_of(params, rows, ok);
  const float s = maximize ? -1.f : 1.f, fl2 = static_cast<float>(l2);
  const float b2 = static_cast<float>(beta2);
  const float one_b1 = static_cast<float>(1.0 - beta1), one_b2 = static_cast<float>(1.0 - beta2);
  const float feps = static_cast<float>(eps);
  const float fshrink = static_cast<float>(shrink);  // 1 - lr·λ for AdamW, else 1
  for_items(items, [&](const Item& it) {
    float* p = params[it.tensor].data_ptr<float>();
    const float* g = grads[it.tensor].data_ptr<float>();
    float* ma = exp_avgs[it.tensor].data_ptr<float>();
    float* va = exp_avg_sqs[it.tensor].data_ptr<float>();
    float* mx = amsgrad ? max_exp_avg_sqs[it.tensor].data_ptr<float>() : nullptr;
    // 1/sqrt(bias correction 2): a product per element instead of a division
    // (torch divides; the two agree to float32 rounding).
    const float ss = step_size[it.tensor], inv_bc = inv_bc2_sqrt[it.tensor];
    walk_rows(it, g, p, s, fl2, [&](auto sum_next, int64_t r, int64_t m, float mean,
                                    const float* gn, const float* wn) {
      constexpr bool kSum = decltype(sum_next)::value;
      float* pr = p + r;
      const float* gr = g + r;
      float* mr = ma + r;
      float* vr = va + r;
      if (amsgrad) {
        float* xr = mx + r;
        return row_loop<kSum>(m, gn, wn, s, fl2, [=](int64_t j) {
          const float w = pr[j];
          const float gh = s * gr[j] + fl2 * w - mean;
          const float mj = mr[j] + one_b1 * (gh - mr[j]);
          const float vj = b2 * vr[j] + one_b2 * gh * gh;
          const float xj = std::max(xr[j], vj);
          mr[j] = mj;
          vr[j] = vj;
          xr[j] = xj;
          pr[j] = w * fshrink - ss * mj / (std::sqrt(xj) * inv_bc + feps);
        });
      }
      return row_loop<kSum>(m, gn, wn, s, fl2, [=](int64_t j) {
        const float w = pr[j];
        const float gh = s * gr[j] + fl2 * w - mean;
        const float mj = mr[j] + one_b1 * (gh - mr[j]);
        const float vj = b2 * vr[j] + one_b2 * gh * gh;
        mr[j] = mj;
        vr[j] = vj;
        pr[j] = w * fshrink - ss * mj / (std::sqrt(vj) * inv_bc + feps);
      });
    });
  });
  return skipped_of(ok);
}

// One row of SGD: buf ← μ·buf + (1-τ)·ĝ (buf ← ĝ when fresh), p ← p·shrink − lr·d.
template <bool kSum, bool kFresh, bool kNesterov>
inline float sgd_row(float* p, const float* g, float* buf, const float* gn, const float* wn,
                     int64_t m, float s, float l2, float mean, float lr, float mu, float damp,
                     float shrink) {
  return row_loop<kSum>(m, gn, wn, s, l2, [=](int64_t j) {
    const float w = p[j];
    const float gh = s * g[j] + l2 * w - mean;
    const float bj = kFresh ? gh : mu * buf[j] + damp * gh;
    buf[j] = bj;
    p[j] = w * shrink - lr * (kNesterov ? gh + mu * bj : bj);
  });
}

std::vector<int64_t> sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::IntArrayRef rows, c10::List<bool> first, double lr,
                          double momentum, double dampening, double l2, double shrink,
                          bool nesterov, bool maximize) {
  const size_t n = params.size();
  const bool has_buf = momentum != 0.0;
  check_sizes(grads.size(), n, "grads");
  if (has_buf) check_sizes(bufs.size(), n, "momentum_buffers");
  if (has_buf) check_sizes(first.size(), n, "first");
  check_sizes(rows.size(), n, "rows");
  std::vector<char> ok(n);
  for (size_t i = 0; i < n; ++i) {
    ok[i] = has_buf ? takes(params[i], {&grads[i], &bufs[i]}, rows[i])
                    : takes(params[i], {&grads[i]}, rows[i]);
  }
  const auto items = items_of(params, rows, ok);
  const float s = maximize ? -1.f : 1.f, fl2 = static_cast<float>(l2);
  const float flr = static_cast<float>(lr), mu = static_cast<float>(momentum);
  const float damp = static_cast<float>(1.0 - dampening), fshrink = static_cast<float>(shrink);
  for_items(items, [&](const Item& it) {
    float* p = params[it.tensor].data_ptr<float>();
    const float* g = grads[it.tensor].data_ptr<float>();
    float* buf = has_buf ? bufs[it.tensor].data_ptr<float>() : nullptr;
    const bool fresh = has_buf && first.get(it.tensor);
    walk_rows(it, g, p, s, fl2, [&](auto sum_next, int64_t r, int64_t m, float mean,
                                    const float* gn, const float* wn) {
      constexpr bool kSum = decltype(sum_next)::value;
      float* pr = p + r;
      const float* gr = g + r;
      if (!has_buf) {
        return row_loop<kSum>(m, gn, wn, s, fl2, [=](int64_t j) {
          const float w = pr[j];
          pr[j] = w * fshrink - flr * (s * gr[j] + fl2 * w - mean);
        });
      }
      const auto args = std::make_tuple(pr, gr, buf + r, gn, wn, m, s, fl2, mean, flr, mu, damp,
                                        fshrink);
      if (fresh) {
        return nesterov ? std::apply(sgd_row<kSum, true, true>, args)
                        : std::apply(sgd_row<kSum, true, false>, args);
      }
      return nesterov ? std::apply(sgd_row<kSum, false, true>, args)
                      : std::apply(sgd_row<kSum, false, false>, args);
    });
  });
  return skipped_of(ok);
}

// The GC pass alone, g ← P(g), in blocks of whole rows of up to kChunk elements:
// first every row's mean (the block streams in from memory once), then the
// subtraction while the block is still in L1/L2. The update kernels' look-ahead
// (walk_rows) lost here: at 2 threads it made this pass 1.3-2.1x a copy of the
// gradients, against 0.64-0.72x for this loop (ResNet-50, 355M sets).
std::vector<int64_t> centralize_(at::TensorList grads, at::IntArrayRef rows) {
  check_sizes(rows.size(), grads.size(), "rows");
  std::vector<char> ok(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) ok[i] = takes(grads[i], {}, rows[i]);
  const auto items = items_of(grads, rows, ok);
  for_items(items, [&](const Item& it) {
    if (it.row == 0) return;  // nothing to centre
    float* g = grads[it.tensor].data_ptr<float>();
    const int64_t m = it.row;  // > 1: rows_hint sends M = 1 as 0
    const int64_t block = std::max<int64_t>(1, kChunk / m) * m;
    float means[kChunk / 2];
    for (int64_t b = it.begin; b < it.end; b += block) {
      const int64_t e = std::min(it.end, b + block);
      int64_t k = 0;
      for (int64_t r = b; r < e; r += m) means[k++] = row_mean(g + r, g + r, m, 1.f, 0.f);
      k = 0;
      for (int64_t r = b; r < e; r += m) {
        float* gr = g + r;
        const float mean = means[k++];
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) gr[j] -= mean;
      }
    }
  });
  return skipped_of(ok);
}

}  // namespace

TORCH_LIBRARY(gradcent_native, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, int[] rows, "
      "float lr, float beta1, float beta2, float eps, float l2, float shrink, bool amsgrad, "
      "bool maximize) -> int[]",
      &adam_);  // steps of taken parameters are incremented in place
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] rows, "
      "bool[] first, float lr, float momentum, float dampening, float l2, float shrink, "
      "bool nesterov, bool maximize) -> int[]",
      &sgd_);
  m.def("centralize_(Tensor(a!)[] grads, int[] rows) -> int[]", &centralize_);
}
