"""Serverless entry points: the HTTP API and the scheduled dispatcher."""
