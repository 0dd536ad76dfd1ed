// GDPA autograd (torchvision's pattern): gdpa_fwd's backward is the first-class op gdpa_bwd, which
// has its own Autograd kernel whose backward fails clearly (no double backward).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/check.h"

namespace attnkit {
namespace gdpa {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& qo, const at::Tensor& ko, const c10::SymInt& mq,
                    const c10::SymInt& mk, c10::string_view act, double qk_scale,
                    double pre_scale, bool causal, int64_t window, bool bq) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attnkit::gdpa_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, c10::SymInt,
                                         c10::SymInt, c10::string_view, double, double, bool,
                                         int64_t, bool)>();
  return op.call(q, k, v, qo, ko, mq, mk, act, qk_scale, pre_scale, causal, window, bq);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& qo, const at::Tensor& ko, const c10::SymInt& mq, const c10::SymInt& mk,
    c10::string_view act, double qk_scale, double pre_scale, bool causal, int64_t window,
    bool bq) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("attnkit::gdpa_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt, c10::string_view,
              double, double, bool, int64_t, bool)>();
  return op.call(dout, q, k, v, qo, ko, mq, mk, act, qk_scale, pre_scale, causal, window, bq);
}

void save_options(AutogradContext* ctx, const c10::SymInt& mq, const c10::SymInt& mk,
                  c10::string_view act, double qk_scale, double pre_scale, bool causal,
                  int64_t window, bool bq) {
  ctx->saved_data["window_size"] = window;
  ctx->saved_data["broadcast_q"] = bq;
  ctx->saved_data["max_seq_len_q"] = mq;
  ctx->saved_data["max_seq_len_kv"] = mk;
  ctx->saved_data["activation"] = std::string(act);
  ctx->saved_data["qk_scale"] = qk_scale;
  ctx->saved_data["pre_scale"] = pre_scale;
  ctx->saved_data["causal"] = causal;
}

class GdpaFunction : public torch::autograd::Function<GdpaFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& q_offsets,
                            const at::Tensor& kv_offsets, const c10::SymInt& mq,
                            const c10::SymInt& mk, c10::string_view act, double qk_scale,
                            double pre_scale, bool causal, int64_t window, bool bq) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = call_fwd(q, k, v, q_offsets, kv_offsets, mq, mk, act, qk_scale, pre_scale, causal,
                        window, bq);
    ctx->save_for_backward({q, k, v, q_offsets, kv_offsets});
    save_options(ctx, mq, mk, act, qk_scale, pre_scale, causal, window, bq);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    if (!grads[0].defined()) return variable_list(13);
    // Through the dispatcher (not below autograd), so a create_graph=True backward reaches
    // GdpaBackwardFunction and its clear double-backward error.
    auto [dq, dk, dv] = call_bwd(grads[0], s[0], s[1], s[2], s[3], s[4], d.at("max_seq_len_q").toSymInt(),
                                 d.at("max_seq_len_kv").toSymInt(), d.at("activation").toStringRef(),
                                 d.at("qk_scale").toDouble(), d.at("pre_scale").toDouble(),
                                 d.at("causal").toBool(), d.at("window_size").toInt(),
                                 d.at("broadcast_q").toBool());
    variable_list grads_in(13);
    grads_in[0] = dq;
    grads_in[1] = dk;
    grads_in[2] = dv;
    return grads_in;
  }
};

class GdpaBackwardFunction : public torch::autograd::Function<GdpaBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                               const c10::SymInt& mq, const c10::SymInt& mk, c10::string_view act,
                               double qk_scale, double pre_scale, bool causal, int64_t window,
                               bool bq) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = call_bwd(dout, q, k, v, q_offsets, kv_offsets, mq, mk, act, qk_scale,
                                 pre_scale, causal, window, bq);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of gdpa is not supported (gdpa_bwd is not differentiable)");
  }
};

at::Tensor gdpa_fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& q_offsets, const at::Tensor& kv_offsets,
                             c10::SymInt mq, c10::SymInt mk, c10::string_view act,
                             double qk_scale, double pre_scale, bool causal, int64_t window,
                             bool bq) {
  check_defined_all(
      {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&q_offsets, "q_offsets"}, {&kv_offsets, "kv_offsets"}});
  return GdpaFunction::apply(q, k, v, q_offsets, kv_offsets, mq, mk, act, qk_scale, pre_scale,
                             causal, window, bq);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdpa_bwd_autograd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& q_offsets, const at::Tensor& kv_offsets, c10::SymInt mq, c10::SymInt mk,
    c10::string_view act, double qk_scale, double pre_scale, bool causal, int64_t window,
    bool bq) {
  check_defined_all({{&dout, "grad_out"},
                     {&q, "q"},
                     {&k, "k"},
                     {&v, "v"},
                     {&q_offsets, "q_offsets"},
                     {&kv_offsets, "kv_offsets"}});
  auto r = GdpaBackwardFunction::apply(dout, q, k, v, q_offsets, kv_offsets, mq, mk, act,
                                       qk_scale, pre_scale, causal, window, bq);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  m.impl("gdpa_fwd", &gdpa_fwd_autograd);
  m.impl("gdpa_bwd", &gdpa_bwd_autograd);
}

}  // namespace gdpa
}  // namespace attnkit
