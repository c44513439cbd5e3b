"""Building blocks of the models: parallel linears and embeddings, norms, rotary embedding, attention."""
