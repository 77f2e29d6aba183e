"""Tests of the trainer bridges (``evsys_async/integrations/``) and of the torch.distributed
coordinator, each against the real library, skipped with the install command where it
is absent."""
