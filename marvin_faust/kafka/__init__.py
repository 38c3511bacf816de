"""Data files of the local Kafka broker: the Maven POM of its jars and its log4j2 config.

The code that uses them is :mod:`marvin_faust.broker`.
"""
