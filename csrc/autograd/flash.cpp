// Flash attention autograd (torchvision's pattern): flash_attn_fwd's backward is the first-class
// op flash_attn_bwd, whose own Autograd kernel fails clearly (no double backward). lse is
// differentiable: a loss or a merge of partial results over key splits (context-parallel / ring
// attention) that uses it passes its gradient to flash_attn_bwd's grad_lse.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/forward_ad.h"
#include "common/flash_serving.h"

namespace attnkit {
namespace flash {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptSymInt = std::optional<c10::SymInt>;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<double>, bool, int64_t,
    int64_t, double, const OptTensor&, const OptTensor&, OptSymInt, OptSymInt, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::optional<double>, bool, int64_t, int64_t, double, const OptTensor&,
    const OptTensor&, OptSymInt, OptSymInt, const OptTensor&, bool, const OptTensor&);

// The options every flash op takes after its tensors, saved once and replayed into the backward.
struct Opts {
  std::optional<double> scale;
  bool causal;
  int64_t wl, wr;
  double softcap;
  OptSymInt mq, mk;
  bool deterministic = false;
};

// The serving tensors of the forward (flash_serving.h); the backward needs seqused_k and s_aux.
struct Serving {
  OptTensor seqused_k, block_table, s_aux, k_descale, v_descale;
};

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const Opts& o,
                                            const OptTensor& cq, const OptTensor& ck,
                                            const Serving& sv) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attnkit::flash_attn_fwd", "").typed<FwdSig>();
  return op.call(q, k, v, o.scale, o.causal, o.wl, o.wr, o.softcap, cq, ck, o.mq, o.mk,
                 sv.seqused_k, sv.block_table, sv.s_aux, sv.k_descale, sv.v_descale,
                 o.deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const Opts& o, const OptTensor& cq,
    const OptTensor& ck, const OptTensor& seqused_k, const OptTensor& grad_lse) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("attnkit::flash_attn_bwd", "").typed<BwdSig>();
  return op.call(dout, q, k, v, out, lse, o.scale, o.causal, o.wl, o.wr, o.softcap, cq, ck, o.mq,
                 o.mk, seqused_k, o.deterministic, grad_lse);
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
  ctx->saved_data["deterministic"] = o.deterministic;
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
  o.deterministic = d.at("deterministic").toBool();
  return o;
}

// Undefined optionals cannot be saved as variables; an undefined tensor stands for None.
OptTensor opt_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

constexpr int kFwdInputs = 18;  // flash_attn_fwd's arguments
constexpr int kSinkInput = 14;  // s_aux's position among them

// The sinks' gradient (flash_serving.h sink_grad) as a node of its own whose backward refuses,
// as FlashBackwardFunction's does: computed by ATen ops on the saved out and lse, it would
// otherwise be differentiated silently and wrongly under create_graph=True.
class SinkGradFunction : public torch::autograd::Function<SinkGradFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& out,
                            const at::Tensor& lse, const at::Tensor& s_aux, bool varlen,
                            const OptTensor& grad_lse) {
    return sink_grad(dout, out, lse, s_aux, varlen, grad_lse);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of flash attention is not supported (the sinks' "
                "gradient s_aux is not differentiable)");
  }
};

class FlashFunction : public torch::autograd::Function<FlashFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, std::optional<double> scale, bool causal,
                               int64_t wl, int64_t wr, double softcap, const OptTensor& cq,
                               const OptTensor& ck, OptSymInt mq, OptSymInt mk,
                               const OptTensor& seqused_k, const OptTensor& block_table,
                               const OptTensor& s_aux, const OptTensor& k_descale,
                               const OptTensor& v_descale, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Opts o{scale, causal, wl, wr, softcap, mq, mk, deterministic};
    auto [out, lse] =
        call_fwd(q, k, v, o, cq, ck, Serving{seqused_k, block_table, s_aux, k_descale, v_descale});
    ctx->save_for_backward({q, k, v, out, lse, cq.value_or(at::Tensor()), ck.value_or(at::Tensor()),
                            seqused_k.value_or(at::Tensor()), s_aux.value_or(at::Tensor())});
    save_opts(ctx, o);
    // backward() handles an undefined grad of out or lse: without this the engine would allocate
    // and zero-fill a gradient for lse on every backward that does not use it (a fill kernel and
    // its host set-up on the 1k calls' host-bound path).
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    variable_list none(kFwdInputs);
    if (!grads[0].defined() && !grads[1].defined()) return none;
    // Only lse used: out's gradient is zero.
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(s[3]);
    const OptTensor grad_lse = opt_of(grads[1]);
    // Through the dispatcher (not below autograd), so a create_graph=True backward reaches
    // FlashBackwardFunction and its clear double-backward error. With a sink, out and lse are
    // the sink-adjusted ones, for which this is the exact backward (flash_serving.h).
    const Opts o = load_opts(ctx);
    auto [dq, dk, dv] = call_bwd(dout, s[0], s[1], s[2], s[3], s[4], o, opt_of(s[5]), opt_of(s[6]),
                                 opt_of(s[7]), grad_lse);
    none[0] = dq;
    none[1] = dk;
    none[2] = dv;
    if (s[8].defined() && s[8].requires_grad()) {
      none[kSinkInput] =
          SinkGradFunction::apply(dout, s[3], s[4], s[8], opt_of(s[5]).has_value(), grad_lse);
    }
    return none;
  }
};

class FlashBackwardFunction : public torch::autograd::Function<FlashBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, std::optional<double> scale, bool causal,
                               int64_t wl, int64_t wr, double softcap, const OptTensor& cq,
                               const OptTensor& ck, OptSymInt mq, OptSymInt mk,
                               const OptTensor& seqused_k, bool deterministic,
                               const OptTensor& grad_lse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = call_bwd(dout, q, k, v, out, lse,
                                 Opts{scale, causal, wl, wr, softcap, mq, mk, deterministic}, cq,
                                 ck, seqused_k, grad_lse);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "attnkit: double backward of flash attention is not supported "
                "(flash_attn_bwd is not differentiable)");
  }
};

bool needs_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> scale,
    bool causal, int64_t wl, int64_t wr, double softcap, const OptTensor& cq, const OptTensor& ck,
    OptSymInt mq, OptSymInt mk, const OptTensor& seqused_k, const OptTensor& block_table,
    const OptTensor& s_aux, const OptTensor& k_descale, const OptTensor& v_descale,
    bool deterministic) {
  check_defined_all({{&q, "q"}, {&k, "k"}, {&v, "v"}});
  const Serving sv{seqused_k, block_table, s_aux, k_descale, v_descale};
  const Opts o{scale, causal, wl, wr, softcap, mq, mk, deterministic};
  check_no_forward_ad("flash_attn_fwd", {{"q", has_forward_grad(q)},
                                         {"k", has_forward_grad(k)},
                                         {"v", has_forward_grad(v)},
                                         {"s_aux", has_forward_grad(s_aux)}});
  const bool wants = q.requires_grad() || k.requires_grad() || v.requires_grad() || needs_grad(s_aux);
  if (!at::GradMode::is_enabled() || !wants) {
    // Nothing to record (inference, or no input needs a gradient): skip the node and its saved
    // tensors, straight to the backend kernel.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fwd(q, k, v, o, cq, ck, sv);
  }
  TORCH_CHECK(!(block_table.has_value() && block_table->defined()),
              "attnkit: block_table: the backward through a paged KV cache is not supported "
              "(q, k_cache, v_cache or s_aux requires grad); call it under torch.no_grad() or "
              "pass contiguous / varlen k and v");
  auto r = FlashFunction::apply(q, k, v, scale, causal, wl, wr, softcap, cq, ck, mq, mk, seqused_k,
                                block_table, s_aux, k_descale, v_descale, deterministic);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_autograd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::optional<double> scale, bool causal,
    int64_t wl, int64_t wr, double softcap, const OptTensor& cq, const OptTensor& ck, OptSymInt mq,
    OptSymInt mk, const OptTensor& seqused_k, bool deterministic, const OptTensor& grad_lse) {
  check_defined_all(
      {{&dout, "grad_out"}, {&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}, {&lse, "lse"}});
  check_no_forward_ad("flash_attn_bwd", {{"grad_out", has_forward_grad(dout)},
                                         {"q", has_forward_grad(q)},
                                         {"k", has_forward_grad(k)},
                                         {"v", has_forward_grad(v)},
                                         {"out", has_forward_grad(out)}});
  if (!at::GradMode::is_enabled()) {
    // The autograd engine runs FlashFunction::backward with grad mode off (unless
    // create_graph=True): no node to record, so no FlashBackwardFunction; this is on the host
    // path of every training step's backward.
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_bwd(dout, q, k, v, out, lse,
                    Opts{scale, causal, wl, wr, softcap, mq, mk, deterministic}, cq, ck, seqused_k,
                    grad_lse);
  }
  auto r = FlashBackwardFunction::apply(dout, q, k, v, out, lse, scale, causal, wl, wr, softcap, cq,
                                        ck, mq, mk, seqused_k, deterministic, grad_lse);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_autograd);
  m.impl("flash_attn_bwd", &flash_attn_bwd_autograd);
}

}  // namespace flash
}  // namespace attnkit
