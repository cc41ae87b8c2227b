# media-engine.mk — the media engine: a high-capacity pjsua2 in .venv (docs/media-engine.md).
#
# Included by the main Makefile. `make media-engine` builds pjsua2 from the pjproject tree of Debian's
# `ring` source package once (about 4 minutes on 2 cores, cached under
# ${SOFTSWITCH_CACHE:-~/.cache/softswitch}/media-engine/) and installs it into .venv; later runs
# install from the cache in seconds. When that fails (no Debian archive reachable, build error) it
# installs the PyPI wheel pjsua2-python==2.10.post6 instead, 32 calls per process, and says so loudly.
# The stamp records which engine is installed (engine=high-capacity or engine=fallback); while it says
# fallback, every `make media-engine` tries the real build again.

MEDIA_ENGINE_SCRIPT := scripts/build-media-engine.sh
MEDIA_ENGINE_CONFIG := media-engine/config_site.h
MEDIA_ENGINE_STAMP := .venv/.media-engine
MEDIA_ENGINE_PYTHON ?= .venv/bin/python

# Retry the real build on every run while the fallback wheel is what is installed.
MEDIA_ENGINE_RETRY := $(shell grep -qs '^engine=fallback' $(MEDIA_ENGINE_STAMP) && echo media-engine-retry)

.PHONY: media-engine media-engine-rebuild media-engine-fallback media-engine-retry

media-engine: $(MEDIA_ENGINE_STAMP)

$(MEDIA_ENGINE_STAMP): .venv/.stamp $(MEDIA_ENGINE_SCRIPT) $(MEDIA_ENGINE_CONFIG) $(MEDIA_ENGINE_RETRY)
	@rm -f $@.tmp
	bash $(MEDIA_ENGINE_SCRIPT) --fallback --python $(MEDIA_ENGINE_PYTHON) --stamp $@.tmp || \
	    bash $(MEDIA_ENGINE_SCRIPT) --fallback-only --python $(MEDIA_ENGINE_PYTHON) --stamp $@.tmp
	@mv $@.tmp $@
	@sed -n 's/^engine=/media engine installed: /p' $@

# Build again even when the cache holds a build with the same key.
media-engine-rebuild: .venv/.stamp
	bash $(MEDIA_ENGINE_SCRIPT) --rebuild --python $(MEDIA_ENGINE_PYTHON) --stamp $(MEDIA_ENGINE_STAMP)

# Install the 32-call PyPI wheel on purpose (e.g. to compare against the built engine).
media-engine-fallback: .venv/.stamp
	bash $(MEDIA_ENGINE_SCRIPT) --fallback-only --python $(MEDIA_ENGINE_PYTHON) --stamp $(MEDIA_ENGINE_STAMP)

media-engine-retry:
