"""Sharing adapters: locations (local, ``file://``, ``s3://``, ``http(s)://``, ``hf://``), a
verified local cache, publishing with a manifest and a model card, and listing.

* ``locations.local_folder`` -- what every "adapter folder" argument goes through;
* ``cache`` -- the content-addressed cache (``adapterkit cache ls / rm / prune``);
* ``publish`` -- ``adapterkit push`` / ``AdapterModel.push_adapter`` and ``adapterkit ls``;
* ``manifest``, ``card``, ``stores`` -- the pieces they are made of.
"""

from .cache import AdapterNotFound, cache_root
from .locations import local_folder, local_model, pull
from .publish import ls, push, push_adapter
from .stores import is_remote

__all__ = ["AdapterNotFound", "cache_root", "is_remote", "local_folder", "local_model", "ls", "pull", "push",
           "push_adapter"]
