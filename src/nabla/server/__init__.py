"""nabla's OpenAI-compatible server: protocol (schemas), serving (request to
generation), text (decoding, stop strings), app (HTTP), batching (the
continuous-batching engine), metrics, commands (`nabla serve`)."""
