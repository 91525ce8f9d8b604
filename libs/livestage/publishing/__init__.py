"""The publisher's side of LiveKit (tokens, tracks, the avatar data-stream protocol) and the MP4
recording used when no LiveKit server is configured. Everything that needs a server is behind
`RoomLink` (see `room.py`)."""

from livestage.publishing.av_frames import AVChunk, FrameAudioAligner, to_pcm16, to_rtc_frames
from livestage.publishing.avatar_protocol import (AUDIO_STREAM_TOPIC, RPC_CLEAR_BUFFER, RPC_PLAYBACK_FINISHED,
                                                  RPC_PLAYBACK_STARTED, AvatarDataStreamBridge)
from livestage.publishing.room import IncomingByteStream, LiveKitRoomLink, LoopbackRoomLink, RoomLink
from livestage.publishing.sinks import LiveKitSink, MediaSink, Mp4RecorderSink
from livestage.publishing.tokens import avatar_token, viewer_token

__all__ = ["AUDIO_STREAM_TOPIC", "AVChunk", "AvatarDataStreamBridge", "FrameAudioAligner", "IncomingByteStream",
           "LiveKitRoomLink", "LiveKitSink", "LoopbackRoomLink", "MediaSink", "Mp4RecorderSink",
           "RPC_CLEAR_BUFFER", "RPC_PLAYBACK_FINISHED", "RPC_PLAYBACK_STARTED", "RoomLink",
           "avatar_token", "to_pcm16", "to_rtc_frames", "viewer_token"]
