"""Stage two: DistilBERT-style students trained with DeepSpeed from the teacher cache."""
