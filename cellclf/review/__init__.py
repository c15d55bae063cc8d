"""Pathologist review queue: store (SQLite/PostgreSQL), web app, export of labels, final counts.

Import :mod:`cellclf.review.store` for the queue API; the web app (:mod:`cellclf.review.app`)
imports FastAPI and is loaded only by ``cellclf review serve`` and its tests.
"""
