// attnkit from C++: calls gdpa_fwd, paged_attention_v1, flash_attn_fwd and moe_permute through the
// C++ API (csrc/attnkit/ops.h -> the dispatcher -> the CPU kernels of the linked op library) and
// checks each against naive loops on small random inputs. Exits non-zero on the first mismatch.
#include <attnkit/ops.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

namespace {

int g_failures = 0;

// Max |a - b| / (1 + |b|) over all elements; both fp32 CPU tensors of the same shape.
void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol = 1e-4) {
  if (got.sizes() != want.sizes()) {
    std::fprintf(stderr, "FAIL %s: shape mismatch\n", what);
    ++g_failures;
    return;
  }
  const auto g = got.to(at::kFloat).contiguous(), w = want.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  double worst = 0;
  int64_t non_finite = 0;  // counted apart: a NaN compared with `worst` would be forgotten later
  for (int64_t i = 0; i < g.numel(); ++i) {
    if (std::isinf(wp[i]) && gp[i] == wp[i]) continue;
    const double e = std::abs(double(gp[i]) - double(wp[i])) / (1.0 + std::abs(double(wp[i])));
    if (!std::isfinite(e)) {
      ++non_finite;
      continue;
    }
    worst = std::max(worst, e);
  }
  const bool ok = non_finite == 0 && worst <= tol;
  std::printf("%s %s: max rel err %.3e (tol %.0e, %lld elements, %lld NaN/inf)\n", ok ? "ok  " : "FAIL",
              what, worst, tol, static_cast<long long>(g.numel()), static_cast<long long>(non_finite));
  if (!ok) ++g_failures;
}

void expect_equal(const char* what, const at::Tensor& got, const std::vector<int64_t>& want) {
  const auto g = got.to(at::kLong).contiguous().view(-1);
  bool ok = g.numel() == int64_t(want.size());
  for (int64_t i = 0; ok && i < g.numel(); ++i) ok = g.data_ptr<int64_t>()[i] == want[i];
  std::printf("%s %s: %lld values\n", ok ? "ok  " : "FAIL", what, static_cast<long long>(want.size()));
  if (!ok) ++g_failures;
}

// ---- gdpa_fwd (DESIGN §3.1), activation gelu_approx, causal, GQA ------------------------------
float gelu_approx(float x) {
  const float u = 0.7978845608f * x * (1.f + 0.044715f * x * x);
  return 0.5f * x * (1.f + std::tanh(u));
}

void check_gdpa() {
  const int64_t H = 4, Hkv = 2, D = 12, G = H / Hkv;
  const std::vector<int64_t> qoff{0, 3, 3, 8}, koff{0, 4, 6, 11};  // the middle sequence has no queries
  const int64_t Tq = qoff.back(), Tk = koff.back();
  const auto q = at::randn({Tq, H, D}), k = at::randn({Tk, Hkv, D}), v = at::randn({Tk, Hkv, D});
  const auto qo = at::tensor(qoff, at::kLong), ko = at::tensor(koff, at::kLong);
  const double qk_scale = 0.5, pre_scale = 0.25;
  const auto out = attnkit::gdpa_fwd(q, k, v, qo, ko, 5, 5, "gelu_approx", qk_scale, pre_scale, /*causal=*/true);

  auto ref = at::zeros({Tq, H, D});
  auto Q = q.accessor<float, 3>(), K = k.accessor<float, 3>(), V = v.accessor<float, 3>();
  auto R = ref.accessor<float, 3>();
  for (size_t b = 0; b + 1 < qoff.size(); ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < qoff[b + 1] - qoff[b]; ++i)
        for (int64_t j = 0; j < koff[b + 1] - koff[b] && j <= i; ++j) {
          float s = 0;
          for (int64_t d = 0; d < D; ++d) s += Q[qoff[b] + i][h][d] * K[koff[b] + j][h / G][d];
          const float p = gelu_approx(float(pre_scale) * s);
          for (int64_t d = 0; d < D; ++d) R[qoff[b] + i][h][d] += float(qk_scale) * p * V[koff[b] + j][h / G][d];
        }
  expect_close("gdpa_fwd (gelu_approx, causal, GQA 2, D 12)", out, ref);
}

// ---- paged_attention_v1 (DESIGN §3.2), vLLM layout, fp32 cache (x = 4) --------------------------
void check_paged() {
  const int64_t S = 3, Hq = 4, Hkv = 2, D = 64, bs = 16, x = 16 / 4, num_blocks = 6, max_blocks = 3;
  const std::vector<int32_t> lens{1, 20, 37};
  const std::vector<int32_t> table{5, 0, 0, 2, 4, 0, 1, 3, 0};  // [S, max_blocks]
  const auto query = at::randn({S, Hq, D});
  const auto kc = at::randn({num_blocks, Hkv, D / x, bs, x});
  const auto vc = at::randn({num_blocks, Hkv, D, bs});
  const auto bt = at::tensor(std::vector<int64_t>(table.begin(), table.end()), at::kLong).to(at::kInt).view({S, max_blocks});
  const auto sl = at::tensor(std::vector<int64_t>(lens.begin(), lens.end()), at::kLong).to(at::kInt);
  const auto one = at::ones({1});
  const double scale = 1.0 / std::sqrt(double(D));
  auto out = at::full({S, Hq, D}, std::numeric_limits<float>::quiet_NaN());
  attnkit::paged_attention_v1(out, query, kc, vc, Hkv, scale, bt, sl, bs, 37, c10::nullopt, "auto", one, one);

  auto ref = at::zeros({S, Hq, D});
  auto Qa = query.accessor<float, 3>();
  auto Ka = kc.accessor<float, 5>();
  auto Va = vc.accessor<float, 4>();
  auto R = ref.accessor<float, 3>();
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kh = h / (Hq / Hkv), L = lens[s];
      std::vector<double> logit(L);
      double mx = -INFINITY, sum = 0;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = table[s * max_blocks + t / bs], off = t % bs;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(Qa[s][h][d]) * Ka[blk][kh][d / x][off][d % x];
        logit[t] = scale * dot;
        mx = std::max(mx, logit[t]);
      }
      for (int64_t t = 0; t < L; ++t) sum += (logit[t] = std::exp(logit[t] - mx));
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = table[s * max_blocks + t / bs], off = t % bs;
        for (int64_t d = 0; d < D; ++d) R[s][h][d] += float(logit[t] / sum * Va[blk][kh][d][off]);
      }
    }
  expect_close("paged_attention_v1 (GQA 2, D 64, block 16, 3 sequences)", out, ref);
}

// ---- flash_attn_fwd (DESIGN §3.3), batched, causal with Sk > Sq (bottom-right aligned) ---------
void check_flash() {
  const int64_t B = 2, Sq = 5, Sk = 7, H = 4, Hkv = 1, D = 32;
  const auto q = at::randn({B, Sq, H, D}), k = at::randn({B, Sk, Hkv, D}), v = at::randn({B, Sk, Hkv, D});
  const auto res = attnkit::flash_attn_fwd(q, k, v, c10::nullopt, /*causal=*/true);
  const auto& out = std::get<0>(res);
  const auto& lse = std::get<1>(res);

  auto ref = at::zeros({B, Sq, H, D});
  auto ref_lse = at::zeros({B, H, Sq});
  auto Q = q.accessor<float, 4>(), K = k.accessor<float, 4>(), V = v.accessor<float, 4>();
  auto R = ref.accessor<float, 4>();
  auto RL = ref_lse.accessor<float, 3>();
  const double scale = 1.0 / std::sqrt(double(D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t last = i + Sk - Sq;  // keys j <= last are visible
        std::vector<double> s(last + 1);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= last; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(Q[b][i][h][d]) * K[b][j][0][d];
          s[j] = scale * dot;
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j <= last; ++j) sum += (s[j] = std::exp(s[j] - mx));
        RL[b][h][i] = float(mx + std::log(sum));
        for (int64_t j = 0; j <= last; ++j)
          for (int64_t d = 0; d < D; ++d) R[b][i][h][d] += float(s[j] / sum * V[b][j][0][d]);
      }
  expect_close("flash_attn_fwd out (causal, Sq 5 < Sk 7, MQA)", out, ref);
  expect_close("flash_attn_fwd lse", lse, ref_lse);
}

// ---- the serving call (docs/serving.md): varlen q over an NHD paged cache with seqused_k and
// sinks, against the contiguous varlen call on the same keys with the sink applied by hand -------
void check_flash_serving() {
  const int64_t H = 2, Hkv = 1, D = 32, bs = 16, nb = 5;
  const std::vector<int64_t> q_lens{1, 3}, k_lens{20, 9};
  const std::vector<std::vector<int32_t>> table{{3, 0}, {4, 1}};
  const auto q = at::randn({4, H, D});
  const auto kc = at::randn({nb, bs, Hkv, D}), vc = at::randn({nb, bs, Hkv, D});
  const auto cu_q = at::tensor(std::vector<int32_t>{0, 1, 4}, at::kInt);
  const auto bt = at::tensor(std::vector<int32_t>{3, 0, 4, 1}, at::kInt).view({2, 2});
  const auto used = at::tensor(std::vector<int32_t>{20, 9}, at::kInt);
  const auto sinks = at::randn({H});
  attnkit::FlashServing serving;
  serving.seqused_k = used;
  serving.block_table = bt;
  serving.s_aux = sinks;
  const auto res = attnkit::flash_attn_fwd(q, kc, vc, c10::nullopt, /*causal=*/true, -1, -1, 0.0,
                                           cu_q, c10::nullopt, 3, 20, serving);

  // The same keys gathered by hand into contiguous varlen k / v, then the plain varlen call.
  std::vector<at::Tensor> ks, vs;
  for (size_t b = 0; b < k_lens.size(); ++b)
    for (int64_t j = 0; j < k_lens[b]; ++j) {
      ks.push_back(kc[table[b][j / bs]][j % bs]);
      vs.push_back(vc[table[b][j / bs]][j % bs]);
    }
  const auto cu_k = at::tensor(std::vector<int32_t>{0, 20, 29}, at::kInt);
  const auto plain = attnkit::flash_attn_fwd(q, at::stack(ks), at::stack(vs), c10::nullopt, true, -1,
                                             -1, 0.0, cu_q, cu_k, 3, 20);
  // Sink: lse = logaddexp(lse0, s_h), out = out0 * exp(lse0 - lse).
  const auto& lse0 = std::get<1>(plain);                       // [H, T]
  const auto lse = at::logaddexp(lse0, sinks.view({H, 1}));
  const auto ref = std::get<0>(plain) * at::exp(lse0 - lse).t().unsqueeze(-1);
  expect_close("flash_attn_fwd serving out (paged, seqused_k, sinks)", std::get<0>(res), ref);
  expect_close("flash_attn_fwd serving lse", std::get<1>(res), lse);
}

// ---- moe_permute (DESIGN §3.4): stable by (expert, token, slot) ------------------------------
void check_moe() {
  const int64_t T = 6, k = 2, E = 4, Hd = 8;
  const std::vector<int64_t> ids{3, 1, 0, 3, 1, 2, 1, 0, 3, 0, 2, 1};  // [T, k]; every expert used
  const auto x = at::randn({T, Hd});
  const auto topk = at::tensor(ids, at::kLong).to(at::kInt).view({T, k});
  const auto res = attnkit::moe_permute(x, topk, E);
  const auto& permuted = std::get<0>(res);
  const auto& offsets = std::get<1>(res);
  const auto& row_map = std::get<2>(res);

  std::vector<int64_t> want_off(E + 1, 0), want_map(T * k);
  auto want_perm = at::zeros({T * k, Hd});
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < k; ++s)
        if (ids[t * k + s] == e) {
          want_map[t * k + s] = row;
          want_perm[row++].copy_(x[t]);
        }
    want_off[e + 1] = row;
  }
  expect_equal("moe_permute expert_offsets", offsets, want_off);
  expect_equal("moe_permute row_map", row_map, want_map);
  expect_close("moe_permute permuted rows", permuted, want_perm, 0.0);
}

// The comparison must fail on one NaN wherever it stands (first, middle or last element), also
// after larger errors: the pre-filled NaN outputs above rely on it.
void check_checker() {
  const int before = g_failures;
  int caught = 0;
  for (int64_t at_index : {int64_t(0), int64_t(3), int64_t(7)}) {
    auto want = at::arange(8, at::kFloat);
    auto got = want.clone();
    got[1] = 100.0f;  // a finite error before and after the NaN
    got[at_index] = std::numeric_limits<float>::quiet_NaN();
    const int f = g_failures;
    expect_close("  (NaN planted, must FAIL)", got, want, 1e9);
    caught += g_failures > f;
  }
  g_failures = before + (caught == 3 ? 0 : 1);
  std::printf("%s expect_close catches a NaN at every position (%d of 3)\n", caught == 3 ? "ok  " : "FAIL",
              caught);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::pair<const char*, void (*)()>> checks{
      {"gdpa_fwd", check_gdpa}, {"paged_attention_v1", check_paged},
      {"flash_attn_fwd", check_flash}, {"flash_attn_fwd serving", check_flash_serving},
      {"moe_permute", check_moe},
      {"expect_close itself", check_checker}};
  for (const auto& c : checks) {
    try {
      c.second();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAIL %s threw: %s\n", c.first, e.what());
      ++g_failures;
    }
  }
  if (g_failures) {
    std::fprintf(stderr, "attnkit C++ API check: %d FAILURE(S)\n", g_failures);
    return EXIT_FAILURE;
  }
  std::printf("attnkit C++ API check: all passed\n");
  return EXIT_SUCCESS;
}
