"""Build Hugging Face `LlamaForCausalLM` from a nabla/Meta state dict, independently of
nabla's own converter, so tests compare against a real peer implementation."""

import torch


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates adjacent channel pairs; HF rotates halves. Reorder the rows
    # of wq/wk so that HF's rotate_half sees the same pairs.
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_model_from_meta(state: dict, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nabla.model.args import DEFAULT_CONTEXT

    rope_scaling = None
    if args.rope_scaling:
        rope_scaling = {"rope_type": "llama3", **args.rope_scaling}
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        max_position_embeddings=DEFAULT_CONTEXT, tie_word_embeddings=args.tie_word_embeddings,
        rope_scaling=rope_scaling, head_dim=args.head_dim, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
          "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state.get("output.weight", state["tok_embeddings.weight"])}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[q + "self_attn.q_proj.weight"] = permute_for_hf(state[p + "attention.wq.weight"], args.n_heads)
        sd[q + "self_attn.k_proj.weight"] = permute_for_hf(state[p + "attention.wk.weight"], args.n_kv_heads)
        sd[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        sd[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        sd[q + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        sd[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        sd[q + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        sd[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        sd[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf
