"""Vigil: a live video assistant runtime. One package per role of the actor graph (ingest, sampler,
interaction, memory), each with its plain classes and one `deployment.py`; `common/` is shared by all."""
