# Convenience targets for machines that already have make; build.sh does the work.
.PHONY: all run test sanitize
all:
	./build.sh build
run:
	./build.sh run
test:
	./build.sh test
sanitize:
	SEGUE_BUILD_TYPE=Sanitize ./build.sh test
