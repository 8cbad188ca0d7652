"""The background brain: answers the questions the interaction model delegates, asynchronously, and delivers
each delegation's one result to its session's inbox."""
