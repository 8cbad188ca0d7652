"""Vigil: a live video assistant runtime. Each module holds one role; `serve_app.py` wraps them in Ray Serve."""
