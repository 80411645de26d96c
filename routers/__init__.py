"""Router networks distilled from searched routes, their training, and loading into a frozen LLM (planned)."""
