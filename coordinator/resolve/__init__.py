"""Resolve: which node can start a sandbox from this template now (RES-1 to RES-5).

``index`` holds the in-memory index kept current by events; ``rank`` the pure rules.
"""
from .index import RegistryNodes, ResolveIndex, load_all, load_one
from .rank import Candidate, NodeEntry, ReplicaEntry, TemplateEntry, answer, choose

__all__ = ["Candidate", "NodeEntry", "RegistryNodes", "ReplicaEntry", "ResolveIndex", "TemplateEntry", "answer",
           "choose", "load_all", "load_one"]
