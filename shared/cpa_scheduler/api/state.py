"""The former name of the API's services, kept only while ``api/messages.py`` (rewritten on
another branch) still annotates with it; use :class:`cpa_scheduler.service.Services`."""

from __future__ import annotations

from cpa_scheduler import service

State = service.Services
