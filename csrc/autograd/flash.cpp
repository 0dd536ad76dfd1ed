// Flash attention autograd (torchvision's pattern): flash_attn_fwd's backward is the first-class
// op flash_attn_bwd, whose own Autograd kernel fails clearly (no double backward). lse is an
// output for the backward's use and is not differentiable.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace attnkit {
namespace flash {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using OptSymInt = std::optional<c10::SymInt>;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, std::optional<double>, bool,
                                                  int64_t, int64_t, double, const OptTensor&,
                                                  const OptTensor&, OptSymInt, OptSymInt);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::optional<double>, bool, int64_t, int64_t, double, const OptTensor&,
    const OptTensor&, OptSymInt, OptSymInt);

// The options every flash op takes after its tensors, saved once and replayed into the backward.
struct Opts {
  std::optional<double> scale;
  bool causal;
  int64_t wl, wr;
  double softcap;
  OptSymInt mq, mk;
};

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const Opts& o,
                                            const OptTensor& cq, const OptTensor& ck) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attnkit::flash_attn_fwd", "").typed<FwdSig>();
  return op.call(q, k, v, o.scale, o.causal, o.wl, o.wr, o.softcap, cq, ck, o.mq, o.mk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const Opts& o, const OptTensor& cq,
    const OptTensor& ck) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attnkit::flash_attn_bwd", "").typed<BwdSig>();
  return op.call(dout, q, k, v, out, lse, o.scale, o.causal, o.wl, o.wr, o.softcap, cq, ck, o.mq,
                 o.mk);
}

void save_opts(AutogradContext* ctx, const Opts& o) {
  ctx->saved_data["has_scale"] = o.scale.has_value();
  ctx->saved_data["scale"] = o.scale.value_or(0.0);
  ctx->saved_data["causal"] = o.causal;
  ctx->saved_data["wl"] = o.wl;
  ctx->saved_data["wr"] = o.wr;
  ctx->saved_data["softcap"] = o.softcap;
  ctx->saved_data["mq"] = o.mq.has_value() ? c10::IValue(*o.mq) : c10::IValue();
  ctx->saved_data["mk"] = o.mk.has_value() ? c10::IValue(*o.mk) : c10::IValue();
}

Opts load_opts(AutogradContext* ctx) {
  const auto& d = ctx->saved_data;
  Opts o;
  if (d.at("has_scale").toBool()) o.scale = d.at("scale").toDouble();
  o.causal = d.at("causal").toBool();
  o.wl = d.at("wl").toInt();
  o.wr = d.at("wr").toInt();
  o.softcap = d.at("softcap").toDouble();
  if (!d.at("mq").isNone()) o.mq = d.at("mq").toSymInt();
  if (!d.at("mk").isNone()) o.mk = d.at("mk").toSymInt();
  return o;
}

// Undefined optionals cannot be saved as variables; an undefined tensor stands for None.
OptTensor opt_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class FlashFunction : public torch::autograd::Function<FlashFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, std::optional<double> scale, bool causal,
                               int64_t wl, int64_t wr, double softcap, const OptTensor& cq,
                               const OptTensor& ck, OptSymInt mq, OptSymInt mk) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Opts o{scale, causal, wl, wr, softcap, mq, mk};
    auto [out, lse] = call_fwd(q, k, v, o, cq, ck);
    ctx->save_for_backward({q, k, v, out, lse, cq.value_or(at::Tensor()), ck.value_or(at::Tensor())});
    save_opts(ctx, o);
    ctx->mark_non_differentiable({lse});
    // lse has no gradient and backward() handles an undefined grad of out: without this the
    // engine would allocate and zero-fill a gradient for lse on every backward (a fill kernel
    // and its host set-up on the 1k calls' host-bound path).
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    variable_list none(12);
    if (!grads[0].defined()) return none;
    // Through the dispatcher (not below autograd), so a create_graph=True backward reaches
    // FlashBackwardFunction and its clear double-backward error.
    auto [dq, dk, dv] = call_bwd(grads[0], s[0], s[1], s[2], s[3], s[4], load_opts(ctx),
                                 opt_of(s[5]), opt_of(s[6]));
    none[0] = dq;
    none[1] = dk;
    none[2] = dv;
    return none;
  }
};

class FlashBackwardFunction : public torch::autograd::Function<FlashBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, std::optional<double> scale, bool causal,
                               int64_t wl, int64_t wr, double softcap, const OptTensor& cq,
                               const OptTensor& ck, OptSymInt mq, OptSymInt mk) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] =
        call_bwd(dout, q, k, v, out, lse, Opts{scale, causal, wl, wr, softcap, mq, mk}, cq, ck);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of flash attention is not supported "
                "(flash_attn_bwd is not differentiable)");
  }
};

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale,
    bool causal, int64_t wl, int64_t wr, double softcap, const OptTensor& cq, const OptTensor& ck,
    OptSymInt mq, OptSymInt mk) {
  if (!at::GradMode::is_enabled() ||
      !(q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    // Nothing to record (inference, or no input needs a gradient): skip the node and its saved
    // tensors, straight to the backend kernel.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd(q, k, v, Opts{scale, causal, wl, wr, softcap, mq, mk}, cq, ck);
  }
  auto r = FlashFunction::apply(q, k, v, scale, causal, wl, wr, softcap, cq, ck, mq, mk);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_autograd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale, bool causal,
    int64_t wl, int64_t wr, double softcap, const OptTensor& cq, const OptTensor& ck,
    OptSymInt mq, OptSymInt mk) {
  if (!at::GradMode::is_enabled()) {
    // The autograd engine runs FlashFunction::backward with grad mode off (unless
    // create_graph=True): no node to record, so no FlashBackwardFunction; this is on the host
    // path of every training step's backward.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_bwd(dout, q, k, v, out, lse, Opts{scale, causal, wl, wr, softcap, mq, mk}, cq, ck);
  }
  auto r = FlashBackwardFunction::apply(dout, q, k, v, out, lse, scale, causal, wl, wr, softcap,
                                        cq, ck, mq, mk);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_autograd);
  m.impl("flash_attn_bwd", &flash_attn_bwd_autograd);
}

}  // namespace flash
}  // namespace attnkit
