"""`pipeline select`: score every cached sequence from the teacher's outputs and write a
fingerprinted selection beside the cache, which `train-student --set data.selection=NAME` reads."""
