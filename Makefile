# The two commands of the README's quick start. Both install what is missing (scripts/setup.sh) and build
# (scripts/build.sh, Release, Ninja, ccache) first.
.PHONY: demo test

# Every feature on the bundled emoji models; writes the gallery demo/index.html.
demo:
	scripts/demo.sh

# The whole test suite (ctest). Extra ctest arguments: make test ARGS="-R DataEmoji"
test:
	scripts/test.sh $(ARGS)
