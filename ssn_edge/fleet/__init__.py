"""Training fan-out: many products trained and exported as Ray tasks, their bundles added to a model repository.

plan: the plan file (jobs, each a recipe + export options + CPUs) and each job's identity hash; task: what one
Ray task does (train_job, then export_bundle); run: the driver (Ray, resumption, the repository, the summary).
Ray is the optional extra `.[fleet]`; nothing here is imported by the rest of ssn_edge.
"""
