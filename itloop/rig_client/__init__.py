"""The rig client: pull a batch, present it, read the recording, count, spool and upload.

Importing this package imports neither PsychoPy nor neo; those live in ``psychopy_presenter``
and ``blackrock`` (the neo reader).
"""
