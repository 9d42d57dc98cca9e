"""`dslc serve`: an OpenAI-compatible server with continuous batching, and a chat page."""
