"""Kuavo ROS1 bags -> LeRobot v3.0 datasets, in pure Python (no ROS installation)."""

from kuavo_train.data.rosbag.topic_map import RosbagError, TopicMap, load_topic_map

__all__ = ["RosbagError", "TopicMap", "load_topic_map"]
