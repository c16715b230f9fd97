"""What keeps a run safe, resumable and tracked: the training job, exact resume, atomic writes, one process per
run folder, the reuse check of a run's files, the non-finite loss stop, head-only training on cached features, the
experiment trackers, and the thread count a command computes with."""
