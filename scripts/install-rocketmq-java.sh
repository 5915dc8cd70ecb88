#!/usr/bin/env bash
# Installs Apache RocketMQ (the Java name server, broker and admin tools) from
# Maven Central, once per version: the jars and their dependencies are copied
# into a classpath folder cached outside the checkout, keyed by version.
#
# Prints the folder holding the jars on stdout (start the servers with
# `java -cp "<folder>/*" ...`); progress goes to stderr.
#
# ROCKETMQ_JAVA_VERSION picks the version (5.5.0 by default: the newest 5.x
# whose server modules all resolve; 5.5.1's namesrv and tools jars are not
# published). A 4.9.x version works too.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

VERSION="${ROCKETMQ_JAVA_VERSION:-5.5.0}"
CACHE_ROOT="${MQPLUG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mqplug}"
PREFIX="$CACHE_ROOT/rocketmq-java-$VERSION"

if [[ -f "$PREFIX/.complete" ]]; then
    echo "$PREFIX/lib"
    exit 0
fi

# Java 17 and Maven come with this kind of machine; install them where not.
if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    echo "installing a Java 17 runtime and Maven (Debian packages)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >&2
fi

echo "installing Apache RocketMQ $VERSION (namesrv, broker, tools) into $PREFIX" >&2
rm -rf "$PREFIX"
mkdir -p "$PREFIX"
mvn -B -q -f "$here/rocketmq-java/pom.xml" \
    -Drocketmq.version="$VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$PREFIX/lib" >&2
touch "$PREFIX/.complete"
echo "$PREFIX/lib"
