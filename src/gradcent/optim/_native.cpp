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
// The math is torch's (FusedAdamKernel.cpp, FusedSGDKernel.cpp) with the
// paper's rule for coupled weight decay: ĝ = P(g + λw) (Yong et al., ECCV 2020,
// §3.4), s = -1 when maximizing.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 16384;  // elements per work item (64 KiB per stream)

struct Item {
  int64_t tensor;
  int64_t begin;  // first element
  int64_t end;    // one past the last element
  int64_t row;    // row length M when centred, 0 when not
};

// Work items of whole rows (centred) or plain chunks (not centred).
std::vector<Item> items_of(at::TensorList params, at::IntArrayRef rows) {
  std::vector<Item> out;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
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

void check(at::TensorList ts, at::TensorList params, const char* what) {
  TORCH_CHECK(ts.size() == params.size(), "gradcent native: ", what, " has ", ts.size(),
              " tensors, params has ", params.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat,
                "gradcent native: ", what, "[", i, "] must be a float32 CPU tensor");
    TORCH_CHECK(t.is_non_overlapping_and_dense() && t.sizes() == params[i].sizes() &&
                    t.strides() == params[i].strides(),
                "gradcent native: ", what, "[", i, "] must be dense and laid out like its parameter");
  }
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

void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
           at::IntArrayRef rows, double lr, double beta1, double beta2, double eps, double l2,
           double decoupled, bool amsgrad, bool maximize) {
  check(params, params, "params");
  check(grads, params, "grads");
  check(exp_avgs, params, "exp_avgs");
  check(exp_avg_sqs, params, "exp_avg_sqs");
  if (amsgrad) check(max_exp_avg_sqs, params, "max_exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size() && rows.size() == params.size(),
              "gradcent native: steps and rows need one entry per parameter");
  const size_t n = params.size();
  std::vector<float> step_size(n), bc2_sqrt(n);
  for (size_t i = 0; i < n; ++i) {
    const double step = steps[i].item<double>();
    step_size[i] = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    bc2_sqrt[i] = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  }
  const auto items = items_of(params, rows);
  const float s = maximize ? -1.f : 1.f, fl2 = static_cast<float>(l2);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float one_b1 = static_cast<float>(1.0 - beta1), one_b2 = static_cast<float>(1.0 - beta2);
  const float feps = static_cast<float>(eps);
  const float shrink = static_cast<float>(1.0 - lr * decoupled);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      float* p = params[it.tensor].data_ptr<float>();
      const float* g = grads[it.tensor].data_ptr<float>();
      float* ma = exp_avgs[it.tensor].data_ptr<float>();
      float* va = exp_avg_sqs[it.tensor].data_ptr<float>();
      float* mx = amsgrad ? max_exp_avg_sqs[it.tensor].data_ptr<float>() : nullptr;
      const float ss = step_size[it.tensor], bc = bc2_sqrt[it.tensor];
      const int64_t m = it.row > 0 ? it.row : it.end - it.begin;
      for (int64_t r = it.begin; r < it.end; r += m) {
        const float mean = it.row > 0 ? row_mean(g + r, p + r, m, s, fl2) : 0.f;
        float* pr = p + r;
        const float* gr = g + r;
        float* mr = ma + r;
        float* vr = va + r;
        if (amsgrad) {
          float* xr = mx + r;
          for (int64_t j = 0; j < m; ++j) {
            const float w = pr[j];
            const float gh = s * gr[j] + fl2 * w - mean;
            const float mj = mr[j] + one_b1 * (gh - mr[j]);
            const float vj = b2 * vr[j] + one_b2 * gh * gh;
            const float xj = std::max(xr[j], vj);
            mr[j] = mj;
            vr[j] = vj;
            xr[j] = xj;
            pr[j] = w * shrink - ss * mj / (std::sqrt(xj) / bc + feps);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            const float w = pr[j];
            const float gh = s * gr[j] + fl2 * w - mean;
            const float mj = mr[j] + one_b1 * (gh - mr[j]);
            const float vj = b2 * vr[j] + one_b2 * gh * gh;
            mr[j] = mj;
            vr[j] = vj;
            pr[j] = w * shrink - ss * mj / (std::sqrt(vj) / bc + feps);
          }
        }
      }
    }
  });
}

// One row of SGD: buf ← μ·buf + (1-τ)·ĝ (buf ← ĝ when fresh), p ← p·shrink − lr·d.
template <bool kFresh, bool kNesterov>
inline void sgd_row(float* __restrict p, const float* __restrict g, float* __restrict buf,
                    int64_t m, float s, float l2, float mean, float lr, float mu, float damp,
                    float shrink) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const float w = p[j];
    const float gh = s * g[j] + l2 * w - mean;
    const float bj = kFresh ? gh : mu * buf[j] + damp * gh;
    buf[j] = bj;
    p[j] = w * shrink - lr * (kNesterov ? gh + mu * bj : bj);
  }
}

void sgd_(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::IntArrayRef rows,
          c10::List<bool> first, double lr, double momentum, double dampening, double l2,
          double shrink, bool nesterov, bool maximize) {
  check(params, params, "params");
  check(grads, params, "grads");
  const bool has_buf = momentum != 0.0;
  if (has_buf) check(bufs, params, "momentum_buffers");
  TORCH_CHECK(rows.size() == params.size() && (!has_buf || first.size() == params.size()),
              "gradcent native: rows and first need one entry per parameter");
  const auto items = items_of(params, rows);
  const float s = maximize ? -1.f : 1.f, fl2 = static_cast<float>(l2);
  const float flr = static_cast<float>(lr), mu = static_cast<float>(momentum);
  const float damp = static_cast<float>(1.0 - dampening), fshrink = static_cast<float>(shrink);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      float* p = params[it.tensor].data_ptr<float>();
      const float* g = grads[it.tensor].data_ptr<float>();
      float* buf = has_buf ? bufs[it.tensor].data_ptr<float>() : nullptr;
      const bool fresh = has_buf && first.get(it.tensor);
      const int64_t m = it.row > 0 ? it.row : it.end - it.begin;
      for (int64_t r = it.begin; r < it.end; r += m) {
        const float mean = it.row > 0 ? row_mean(g + r, p + r, m, s, fl2) : 0.f;
        float* pr = p + r;
        const float* gr = g + r;
        if (!has_buf) {
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) {
            const float w = pr[j];
            pr[j] = w * fshrink - flr * (s * gr[j] + fl2 * w - mean);
          }
          continue;
        }
        float* br = buf + r;
        if (fresh) {
          if (nesterov) sgd_row<true, true>(pr, gr, br, m, s, fl2, mean, flr, mu, damp, fshrink);
          else sgd_row<true, false>(pr, gr, br, m, s, fl2, mean, flr, mu, damp, fshrink);
        } else {
          if (nesterov) sgd_row<false, true>(pr, gr, br, m, s, fl2, mean, flr, mu, damp, fshrink);
          else sgd_row<false, false>(pr, gr, br, m, s, fl2, mean, flr, mu, damp, fshrink);
        }
      }
    }
  });
}

void centralize_(at::TensorList grads, at::IntArrayRef rows) {
  check(grads, grads, "grads");
  TORCH_CHECK(rows.size() == grads.size(), "gradcent native: rows needs one entry per tensor");
  const auto items = items_of(grads, rows);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Item& it = items[k];
      if (it.row == 0) continue;
      float* g = grads[it.tensor].data_ptr<float>();
      for (int64_t r = it.begin; r < it.end; r += it.row) {
        const float mean = row_mean(g + r, g + r, it.row, 1.f, 0.f);
        float* gr = g + r;
#pragma omp simd
        for (int64_t j = 0; j < it.row; ++j) gr[j] -= mean;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(gradcent_native, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, int[] rows, "
      "float lr, float beta1, float beta2, float eps, float l2, float decoupled, bool amsgrad, "
      "bool maximize) -> ()",
      &adam_);
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] rows, "
      "bool[] first, float lr, float momentum, float dampening, float l2, float shrink, "
      "bool nesterov, bool maximize) -> ()",
      &sgd_);
  m.def("centralize_(Tensor(a!)[] grads, int[] rows) -> ()", &centralize_);
}
