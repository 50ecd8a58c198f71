"""nabla's OpenAI-compatible server: protocol (request schemas), serving (request
to generation), run (a request's sequences on the engine), responses (OpenAI's
bodies and chunks), text (decoding, stop strings), app (HTTP), batching (the
continuous-batching engine), metrics; the command is nabla.cli.serve."""
