"""Integrations of fastattn with other libraries.

Each integration is a submodule that imports its library when it is imported itself, never
earlier: `import fastattn` imports none of them.

    from fastattn.integrations import transformers as fa_hf
    fa_hf.register()                      # attn_implementation="fastattn" in Hugging Face models
"""
