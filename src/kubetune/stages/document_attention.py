"""Packed examples kept apart in BLOOM, whose attention ignores ``position_ids``: FlexAttention with a document
block mask and ALiBi's bias as a ``score_mod``.

transformers 5.24's BLOOM has no attention interface: ``BloomForCausalLM.forward`` drops ``position_ids``,
``BloomModel`` builds ALiBi from a 2-D padding mask and adds it inside ``BloomAttention``'s own eager baddbmm.
``use_document_attention`` changes three things on one loaded model, all through PyTorch's and transformers'
public hooks (nothing of the library is replaced globally):

* a forward pre-hook on the causal LM turns the packed batch's ``position_ids`` (restarting at 0 per example,
  stages/packing.py) into a document mask (causal, same example only) passed as ``attention_mask``: a
  FlexAttention ``BlockMask`` on CUDA, a dense boolean (rows, 1, tokens, tokens) elsewhere, because FlexAttention
  has no backward on the CPU (torch 2.13); transformers' ``create_causal_mask`` passes a 4-D mask through;
* ``BloomModel.build_alibi_tensor`` (an instance attribute) returns the per-head ALiBi slopes (1-D) for that mask
  instead of a (rows × heads, 1, keys) bias, and the 1-D slopes are how each layer knows the batch is packed;
* each ``BloomAttention.forward`` adds ``slope_h · (key − query)`` to the scores: ``flex_attention`` with a
  ``score_mod`` on CUDA, ``scaled_dot_product_attention`` with that bias as a float mask elsewhere.

ALiBi alone adds ``slope_h · key_position``; a packed example starting at offset ``o`` would see
``slope_h · (o + j)``, which differs from its unpacked bias by ``slope_h · o`` for every key of a query: softmax
ignores a constant per query, so ``slope_h · (key − query)`` gives each example exactly its unpacked attention
(tests/test_packing.py compares logits and loss for every shipped architecture). The relative form also keeps
the bias small (≤ 0 and bounded by the example's length), where the absolute one grows with the row.

On CUDA without ``torch.compile`` FlexAttention runs an unfused reference (it materialises the scores, as BLOOM's
eager path does); compiled (``finetune.compile``) it becomes one fused kernel with no (keys × queries) mask in
memory. The CPU path materialises a (rows, heads, tokens, tokens) bias, as BLOOM's eager attention does.
"""

from __future__ import annotations

import types

ARCHITECTURES = ("bloom",)  # model_type values whose packing goes through this module


def supports(model) -> bool:
    return getattr(model.config, "model_type", None) in ARCHITECTURES


def document_ids(position_ids):
    """Which example each token belongs to: a new one starts wherever the position does not rise by 1
    (transformers' own rule, masking_utils.find_packed_sequence_indices, without its "no packing" shortcut)."""
    import torch

    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def document_block_mask(position_ids):
    """Causal attention within each packed example, as a FlexAttention BlockMask (batch, 1, tokens, tokens)."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = document_ids(position_ids)
    rows, length = documents.shape

    def same_example_causal(b, h, q, kv):
        return (kv <= q) & (documents[b, q] == documents[b, kv])

    return create_block_mask(same_example_causal, rows, None, length, length, device=position_ids.device)


def dense_document_mask(position_ids):
    """The same mask as booleans (rows, 1, tokens, tokens): True where a query may attend to a key."""
    import torch

    documents = document_ids(position_ids)
    length = documents.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def use_document_attention(model, flex: bool | None = None) -> None:
    """Make a loaded BLOOM causal LM keep packed examples apart (idempotent); see the module docstring.
    ``flex``: FlexAttention (True) or the dense bias (False); None: FlexAttention on CUDA only."""
    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "_kubetune_document_attention", False):
        return
    causal_lm._kubetune_flex_attention = flex
    from transformers.models.bloom.modeling_bloom import BloomAttention, _get_alibi_slopes

    backbone = causal_lm.transformer
    original_alibi = backbone.build_alibi_tensor

    def build_alibi_tensor(attention_mask, num_heads, dtype):
        if _is_block_mask(attention_mask):  # the slopes; each layer adds slope · (key − query)
            return _get_alibi_slopes(num_heads, attention_mask.kv_indices.device)
        if attention_mask.dim() == 4:
            return _get_alibi_slopes(num_heads, attention_mask.device)
        return original_alibi(attention_mask, num_heads, dtype)

    backbone.build_alibi_tensor = build_alibi_tensor
    for module in causal_lm.modules():
        if isinstance(module, BloomAttention):
            module._kubetune_eager_forward = module.forward
            module.forward = types.MethodType(_document_attention_forward, module)
    causal_lm.register_forward_pre_hook(_position_ids_to_block_mask, with_kwargs=True)
    causal_lm._kubetune_document_attention = True


def _causal_lm(model):
    """The BloomForCausalLM inside a peft wrapper, or the model itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports(inner):
        raise ValueError(f"document attention is for {ARCHITECTURES}, not {inner.config.model_type}")
    return inner


def _is_block_mask(mask) -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _position_ids_to_block_mask(module, args, kwargs):
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is None or kwargs.get("attention_mask") is not None:
        return args, kwargs  # generation and unpacked batches: BLOOM's own path
    flex = module._kubetune_flex_attention
    flex = position_ids.device.type == "cuda" if flex is None else flex
    kwargs["attention_mask"] = (document_block_mask if flex else dense_document_mask)(position_ids)
    return args, kwargs


def _document_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                                use_cache=False, output_attentions=False, **kwargs):
    """BloomAttention.forward for a packed batch (``attention_mask`` a document mask, ``alibi`` the 1-D slopes).
    Attention dropout is not applied on this path (BLOOM's configs ship attention_dropout 0.0)."""
    if alibi.dim() != 1:
        return self._kubetune_eager_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                            use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    import torch
    from transformers.models.bloom.modeling_bloom import dropout_add

    rows, length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # each (rows, heads, tokens, head_dim)
    slopes = alibi
    if _is_block_mask(attention_mask):
        from torch.nn.attention.flex_attention import flex_attention

        def alibi_bias(score, b, h, q, kv):
            return score + (slopes[h] * (kv - q)).to(score.dtype)

        context = flex_attention(query, key, value, score_mod=alibi_bias, block_mask=attention_mask,
                                 scale=self.inv_norm_factor)
    else:
        positions = torch.arange(length, device=query.device)
        bias = slopes[:, None, None] * (positions[None, :] - positions[:, None])  # (heads, queries, keys)
        bias = bias.to(query.dtype).masked_fill(~attention_mask, torch.finfo(query.dtype).min)
        context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                                   scale=self.inv_norm_factor)
    context = context.transpose(1, 2).reshape(rows, length, self.num_heads * self.head_dim)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None
