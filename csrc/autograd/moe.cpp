// MoE routing autograd (torchvision's pattern, as for GDPA). moe_route's backward is its own op
// (_moe_route_bwd) with CPU and CUDA kernels; moe_permute's backward is
// moe_unpermute with unit weights (a gather, so no atomics); moe_unpermute's and grouped_gemm's
// backwards are first-class ops with their own kernels; silu_and_mul's backward is a few
// elementwise ATen ops; grouped_gemm_swiglu's backward recomputes the [M, 2I] product (the forward
// never stores it) and reuses grouped_gemm, the SwiGLU derivative and _grouped_gemm_wgrad. Every
// backward goes through the dispatcher so it runs on any device and under FakeTensor. The two
// backward-only ops refuse double backward clearly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "autograd/forward_ad.h"

namespace attnkit {
namespace moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using Perm3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

Perm3 call_permute(const at::Tensor& x, const at::Tensor& ids, int64_t E) {
  static auto op =
      op_handle<Perm3(const at::Tensor&, const at::Tensor&, int64_t)>("attnkit::moe_permute");
  return op.call(x, ids, E);
}

at::Tensor call_unpermute(const at::Tensor& p, const at::Tensor& rm, const at::Tensor& w) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "attnkit::moe_unpermute");
  return op.call(p, rm, w);
}

Pair call_unpermute_bwd(const at::Tensor& g, const at::Tensor& p, const at::Tensor& rm,
                        const at::Tensor& w) {
  static auto op = op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&)>("attnkit::_moe_unpermute_bwd");
  return op.call(g, p, rm, w);
}

at::Tensor call_grouped_gemm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "attnkit::grouped_gemm");
  return op.call(a, w, off);
}

at::Tensor call_wgrad(const at::Tensor& a, const at::Tensor& g, const at::Tensor& off) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "attnkit::_grouped_gemm_wgrad");
  return op.call(a, g, off);
}

at::Tensor call_silu_and_mul(const at::Tensor& x) {
  static auto op = op_handle<at::Tensor(const at::Tensor&)>("attnkit::silu_and_mul");
  return op.call(x);
}

at::Tensor call_grouped_gemm_swiglu(const at::Tensor& a, const at::Tensor& w,
                                    const at::Tensor& off) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "attnkit::grouped_gemm_swiglu");
  return op.call(a, w, off);
}

// The gradient in h = [gate | up] of silu(gate) * up, in the accumulation dtype, returned in h's
// dtype: d silu(a)/da = σ(a)(1 + a(1 − σ(a))).
at::Tensor swiglu_grad(const at::Tensor& h, const at::Tensor& grad) {
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto hf = h.to(acc);
  const auto g = grad.to(acc);
  auto halves = hf.chunk(2, -1);
  const auto& a = halves[0];
  const auto& b = halves[1];
  const auto sig = at::sigmoid(a);
  auto da = g * b * sig * (1 + a * (1 - sig));
  auto db = g * a * sig;
  return at::cat({da, db}, -1).to(h.scalar_type());
}

using OptTensor = std::optional<at::Tensor>;
using Route4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Route4 call_route(const at::Tensor& logits, int64_t k, c10::string_view scoring, bool renormalize,
                  const OptTensor& bias, int64_t n_group, int64_t topk_group, double scale,
                  bool return_losses) {
  static auto op =
      op_handle<Route4(const at::Tensor&, int64_t, c10::string_view, bool, const OptTensor&,
                       int64_t, int64_t, double, bool)>("attnkit::moe_route");
  return op.call(logits, k, scoring, renormalize, bias, n_group, topk_group, scale, return_losses);
}

at::Tensor call_route_bwd(const OptTensor& gw, const OptTensor& ga, const OptTensor& gz,
                          const at::Tensor& logits, const at::Tensor& ids, c10::string_view scoring,
                          bool renormalize, double scale) {
  static auto op =
      op_handle<at::Tensor(const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, c10::string_view, bool, double)>(
          "attnkit::_moe_route_bwd");
  return op.call(gw, ga, gz, logits, ids, scoring, renormalize, scale);
}

// An undefined tensor stands for an absent gradient.
OptTensor opt_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// moe_route: the weights and the two losses are differentiable in logits; ids are not, and the
// bias (which only shifts the selection) gets no gradient. The backward recomputes the scores
// from the saved logits (one pass over a row) instead of saving [T, E] probabilities.
class RouteFunction : public torch::autograd::Function<RouteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k,
                               c10::string_view scoring, bool renormalize, const OptTensor& bias,
                               int64_t n_group, int64_t topk_group, double scale,
                               bool return_losses) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, ids, aux, z] = call_route(logits, k, scoring, renormalize, bias, n_group, topk_group,
                                       scale, return_losses);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["scoring"] = std::string(scoring);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scale;
    if (return_losses) {
      ctx->mark_non_differentiable({ids});
    } else {
      ctx->mark_non_differentiable({ids, aux, z});  // [0]-shaped placeholders
    }
    ctx->set_materialize_grads(false);  // absent gradients stay absent (no zero-filled [T, k])
    return {w, ids, aux, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list none(9);
    if (!grads[0].defined() && !grads[2].defined() && !grads[3].defined()) return none;
    const auto s = ctx->get_saved_variables();
    const auto scoring = ctx->saved_data["scoring"].toStringRef();
    none[0] = call_route_bwd(opt_of(grads[0]), opt_of(grads[2]), opt_of(grads[3]), s[0], s[1],
                             scoring, ctx->saved_data["renormalize"].toBool(),
                             ctx->saved_data["scale"].toDouble());
    return none;
  }
};

class RouteBwdFunction : public torch::autograd::Function<RouteBwdFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const OptTensor& gw, const OptTensor& ga,
                            const OptTensor& gz, const at::Tensor& logits, const at::Tensor& ids,
                            c10::string_view scoring, bool renormalize, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_route_bwd(gw, ga, gz, logits, ids, scoring, renormalize, scale);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of moe_route is not supported");
  }
};

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ids,
                               int64_t num_experts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [permuted, offsets, row_map] = call_permute(x, ids, num_experts);
    ctx->save_for_backward({row_map});
    ctx->mark_non_differentiable({offsets, row_map});
    // offsets and row_map have no gradient, and backward() handles an undefined one for
    // permuted: without this the engine allocates and zero-fills both index tensors' "gradients"
    // on every backward.
    ctx->set_materialize_grads(false);
    return {permuted, offsets, row_map};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto row_map = ctx->get_saved_variables()[0];
    // Each token row went to k permuted rows: its gradient is their sum, i.e. an unpermute.
    auto ones = at::ones_symint(row_map.sym_sizes(), row_map.options().dtype(at::kFloat));
    return {call_unpermute(grads[0], row_map, ones), at::Tensor(), at::Tensor()};
  }
};

class UnpermuteFunction : public torch::autograd::Function<UnpermuteFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& perm,
                            const at::Tensor& row_map, const at::Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({perm, row_map, w});
    return call_unpermute(perm, row_map, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    auto [grad_perm, grad_w] = call_unpermute_bwd(grads[0], s[0], s[1], s[2]);
    return {grad_perm, at::Tensor(), grad_w};
  }
};

class GroupedGemmFunction : public torch::autograd::Function<GroupedGemmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& w,
                            const at::Tensor& off) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, w, off});
    return call_grouped_gemm(a, w, off);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    const auto g = grads[0].contiguous();
    // dA = dC · W[e]ᵀ per row block (W transposed as a view, no copy); dW[e] = A_eᵀ dC_e. Each
    // only where its input needs it (frozen experts: no weight gradient, a GEMM as large as the
    // forward's).
    at::Tensor grad_a, grad_w;
    if (ctx->needs_input_grad(0)) grad_a = call_grouped_gemm(g, s[1].transpose(1, 2), s[2]);
    if (ctx->needs_input_grad(1)) grad_w = call_wgrad(s[0], g, s[2]);
    return {grad_a, grad_w, at::Tensor()};
  }
};

class SiluAndMulFunction : public torch::autograd::Function<SiluAndMulFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    return call_silu_and_mul(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor()};
    return {swiglu_grad(ctx->get_saved_variables()[0], grads[0])};
  }
};

class GroupedGemmSwigluFunction : public torch::autograd::Function<GroupedGemmSwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& w,
                            const at::Tensor& off) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({a, w, off});
    return call_grouped_gemm_swiglu(a, w, off);
  }

  // h = a·W[e] [M, 2I] exists only here (rows outside every expert are 0, so is their dh);
  // dA = dh·W[e]ᵀ, dW[e] = A_eᵀ dh_e.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto s = ctx->get_saved_variables();
    auto dh = swiglu_grad(call_grouped_gemm(s[0], s[1], s[2]), grads[0]).contiguous();
    at::Tensor grad_a, grad_w;  // each only where its input needs it (as GroupedGemmFunction)
    if (ctx->needs_input_grad(0)) grad_a = call_grouped_gemm(dh, s[1].transpose(1, 2), s[2]);
    if (ctx->needs_input_grad(1)) grad_w = call_wgrad(s[0], dh, s[2]);
    return {grad_a, grad_w, at::Tensor()};
  }
};

class UnpermuteBwdFunction : public torch::autograd::Function<UnpermuteBwdFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& p,
                               const at::Tensor& rm, const at::Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gp, gw] = call_unpermute_bwd(g, p, rm, w);
    return {gp, gw};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of moe_unpermute is not supported");
  }
};

class WgradFunction : public torch::autograd::Function<WgradFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& a, const at::Tensor& g,
                            const at::Tensor& off) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_wgrad(a, g, off);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "attnkit: double backward of grouped_gemm's weight gradient is not supported");
  }
};

Route4 moe_route_autograd(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                          bool renormalize, const OptTensor& bias, int64_t n_group,
                          int64_t topk_group, double scale, bool return_losses) {
  check_defined_all({{&logits, "logits"}});
  check_no_forward_ad("moe_route", {{"logits", has_forward_grad(logits)}});
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_route(logits, k, scoring, renormalize, bias, n_group, topk_group, scale,
                      return_losses);
  }
  auto r = RouteFunction::apply(logits, k, scoring, renormalize, bias, n_group, topk_group, scale,
                                return_losses);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor moe_route_bwd_autograd(const OptTensor& gw, const OptTensor& ga, const OptTensor& gz,
                                  const at::Tensor& logits, const at::Tensor& ids,
                                  c10::string_view scoring, bool renormalize, double scale) {
  check_defined_all({{&logits, "logits"}, {&ids, "ids"}});
  if (!at::GradMode::is_enabled()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_route_bwd(gw, ga, gz, logits, ids, scoring, renormalize, scale);
  }
  return RouteBwdFunction::apply(gw, ga, gz, logits, ids, scoring, renormalize, scale);
}

Perm3 moe_permute_autograd(const at::Tensor& x, const at::Tensor& ids, int64_t E) {
  check_defined_all({{&x, "x"}, {&ids, "topk_ids"}});
  auto r = PermuteFunction::apply(x, ids, E);
  return {r[0], r[1], r[2]};
}

at::Tensor moe_unpermute_autograd(const at::Tensor& p, const at::Tensor& rm, const at::Tensor& w) {
  check_defined_all({{&p, "permuted_out"}, {&rm, "row_map"}, {&w, "topk_weights"}});
  return UnpermuteFunction::apply(p, rm, w);
}

Pair moe_unpermute_bwd_autograd(const at::Tensor& g, const at::Tensor& p, const at::Tensor& rm,
                                const at::Tensor& w) {
  check_defined_all(
      {{&g, "grad_out"}, {&p, "permuted_out"}, {&rm, "row_map"}, {&w, "topk_weights"}});
  auto r = UnpermuteBwdFunction::apply(g, p, rm, w);
  return {r[0], r[1]};
}

at::Tensor grouped_gemm_autograd(const at::Tensor& a, const at::Tensor& w, const at::Tensor& off) {
  check_defined_all({{&a, "a"}, {&w, "w"}, {&off, "expert_offsets"}});
  return GroupedGemmFunction::apply(a, w, off);
}

at::Tensor wgrad_autograd(const at::Tensor& a, const at::Tensor& g, const at::Tensor& off) {
  check_defined_all({{&a, "a"}, {&g, "grad_out"}, {&off, "expert_offsets"}});
  return WgradFunction::apply(a, g, off);
}

at::Tensor silu_and_mul_autograd(const at::Tensor& x) {
  check_defined_all({{&x, "x"}});
  return SiluAndMulFunction::apply(x);
}

at::Tensor grouped_gemm_swiglu_autograd(const at::Tensor& a, const at::Tensor& w,
                                        const at::Tensor& off) {
  check_defined_all({{&a, "a"}, {&w, "w"}, {&off, "expert_offsets"}});
  return GroupedGemmSwigluFunction::apply(a, w, off);
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  m.impl("moe_route", &moe_route_autograd);
  m.impl("_moe_route_bwd", &moe_route_bwd_autograd);
  m.impl("moe_permute", &moe_permute_autograd);
  m.impl("moe_unpermute", &moe_unpermute_autograd);
  m.impl("_moe_unpermute_bwd", &moe_unpermute_bwd_autograd);
  m.impl("grouped_gemm", &grouped_gemm_autograd);
  m.impl("_grouped_gemm_wgrad", &wgrad_autograd);
  m.impl("silu_and_mul", &silu_and_mul_autograd);
  m.impl("grouped_gemm_swiglu", &grouped_gemm_swiglu_autograd);
}

}  // namespace moe
}  // namespace attnkit
