"""`pipeline finetune` and `pipeline fetch-task`: students and teachers on a downstream task."""
