#!/usr/bin/env python3
"""Build the builtin ``lmforge_qa`` extractive QA set (SQuAD v2 format).

The passages are public-domain text already shipped with lmforge:
  * World English Bible verses (``lmforge/data/builtin/bible_en_es``, English side),
    4-8 consecutive verses of one chapter joined with single spaces;
  * a few passages of Shakespeare's complete works
    (``lmforge/data/builtin/shakespeare/shakespeare.txt.gz``), a range of lines,
    each line stripped, blank lines dropped, joined with single spaces.

The questions and answers below were written by hand by reading each passage.
An answer is written as the exact text of the passage; straight apostrophes in
an answer also match the typographic ones (’) the WEB text uses, and the stored
answer is always the passage's own text. ``#N`` after an answer selects its N-th
occurrence in the passage (default: the first). ``-`` marks a question that the
passage does not answer (SQuAD v2 "impossible" question).

Output: ``lmforge/data/builtin/lmforge_qa/{train,validation,test}.jsonl.gz``
(split by passage, fixed seed, gzip mtime 0: reruns give identical bytes).

    .venv/bin/python scripts/make_qa_set.py            # build and write
    .venv/bin/python scripts/make_qa_set.py --check    # build and validate only
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "lmforge" / "data" / "builtin"
OUT_DIR = BUILTIN / "lmforge_qa"
SEED = 20240611
SPLITS = (("train", 0.70), ("validation", 0.10), ("test", 0.20))
MIN_CONTEXT, MAX_CONTEXT = 300, 1000

BOOKS = {
    "Gen": "Genesis", "Exod": "Exodus", "Num": "Numbers", "Josh": "Joshua",
    "Judg": "Judges", "Ruth": "Ruth", "1Sam": "1 Samuel", "2Sam": "2 Samuel",
    "1Kgs": "1 Kings", "2Kgs": "2 Kings", "Neh": "Nehemiah", "Esth": "Esther",
    "Job": "Job", "Dan": "Daniel", "Jonah": "Jonah", "Matt": "Matthew",
    "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts",
}

# Passage headers:
#   @ Gen.2.8-14                      book.chapter.first-last verse (WEB, English)
#   @ shakespeare 13485-13503 | Title  first-last line (1-based) of shakespeare.txt
# then one "question | answer" line per question.
ANNOTATIONS = r"""
@ Gen.2.8-14
Where did Yahweh God plant the garden? | Eden
Which tree stood in the middle of the garden besides the tree of knowledge? | the tree of life
How many rivers did the river out of Eden become the source of? | four
What precious metal is found in the land of Havilah? | gold
Which river flows in front of Assyria? | Hiddekel

@ Gen.4.1-8
What was Abel's occupation? | a keeper of sheep
What did Cain bring as his offering to Yahweh? | the fruit of the ground
Where did Cain kill his brother? | in the field
How old was Cain when he killed Abel? | -

@ Gen.6.13-16
What kind of wood was Noah told to build the ship from? | gopher wood
What was the ship to be sealed with inside and outside? | pitch
How long was the ship to be? | three hundred cubits
Where was the door of the ship to be set? | in its side
How many years did it take Noah to build the ship? | -

@ Gen.7.6-12
How old was Noah when the flood came? | six hundred years old
In which month did the fountains of the great deep burst open? | the second month
For how long did it rain on the earth? | forty days and forty nights

@ Gen.8.6-12
Which bird did Noah send out first? | a raven
What did the dove bring back in her mouth? | a freshly plucked olive leaf
How long did Noah wait before sending the dove out again? | seven days
On which mountain had the ship come to rest? | -

@ Gen.11.1-5
In which land did the travelers find a plain to settle on? | Shinar
What did the builders use for mortar? | tar
Besides a city, what did the people want to build? | a tower
What name was given to the city? | -

@ Gen.12.10-15
Why did Abram go down into Egypt? | famine
What was the name of Abram's wife? | Sarai
What did Abram ask his wife to say she was? | my sister
Who praised the woman to Pharaoh? | The princes of Pharaoh

@ Gen.21.1-7
What did Abraham name the son Sarah bore him? | Isaac
How old was Isaac when Abraham circumcised him? | eight days old
How old was Abraham when his son was born? | one hundred years old
How old was Sarah when she gave birth? | -

@ Gen.22.1-6
To which land was Abraham told to take his son? | Moriah
Which animal did Abraham saddle? | his donkey
How many young men did Abraham take with him? | two
On which day did Abraham see the place far off? | the third day
What did Abraham carry in his hand? | the fire and the knife

@ Gen.24.15-20
Who was Rebekah's father? | Bethuel
What was Rebekah carrying on her shoulder? | her pitcher
Where did Rebekah empty her pitcher for the camels? | into the trough
How many camels did the servant have with him? | -

@ Gen.25.24-28
What was the first twin named? | Esau
What was Jacob holding when he was born? | Esau's heel
How old was Isaac when the twins were born? | sixty years old
Why did Isaac love Esau? | because he ate his venison
Which of the parents loved Jacob? | Rebekah

@ Gen.25.29-34
What was Jacob cooking when Esau came in from the field? | stew
What did Jacob ask Esau to sell him? | birthright
Because of the red stew, what was Esau's name called? | Edom
What did Jacob give Esau to eat? | bread and lentil stew
What animal had Esau been hunting? | -

@ Gen.29.15-20
How many daughters did Laban have? | two
What was the name of Laban's elder daughter? | Leah
How long did Jacob agree to serve for Rachel? | seven years
How old was Jacob when he began to serve Laban? | -

@ Gen.37.2-8
How old was Joseph when he fed the flock with his brothers? | seventeen years old
What did Israel make for Joseph? | a tunic of many colors
Why did Israel love Joseph more than all his other children? | because he was the son of his old age
In Joseph's dream, what were the brothers binding in the field? | sheaves

@ Gen.37.25-28
Where was the caravan of Ishmaelites coming from? | Gilead
What were the caravan's camels carrying? | spices and balm and myrrh
Which brother proposed selling Joseph? | Judah
For how much was Joseph sold? | twenty pieces of silver
How old was Joseph when he was sold? | -

@ Gen.41.1-7
How long was it before Pharaoh had his dream? | two full years
Where did the first seven cattle feed? | in the marsh grass
How many heads of grain came up on one stalk? | seven #4
What had blasted the thin heads of grain? | the east wind
Who interpreted Pharaoh's dreams? | -

@ Gen.41.46-49
How old was Joseph when he stood before Pharaoh? | thirty years old
Where did Joseph lay up the food? | in the cities
To what is the amount of grain Joseph gathered compared? | the sand of the sea

@ Gen.5.24-27
Who walked with God and was taken by him? | Enoch
How old was Methuselah when his son Lamech was born? | one hundred eighty-seven years
How many years did Methuselah live in all? | nine hundred sixty-nine years
How old was Lamech when Methuselah died? | -

@ Gen.14.13-16
Where was Abram living at that time? | by the oaks of Mamre
How many trained men did Abram lead out? | three hundred eighteen
How far did Abram pursue the captors at first? | Dan
Which relative did Abram bring back? | Lot
Who had taken Abram's relative captive? | -

@ Exod.2.1-6
How long did the mother hide her son? | three months
What was the basket made of? | papyrus
Who watched from far off to see what would happen to the child? | His sister
Who came down to the river to bathe? | Pharaoh's daughter
What name did Pharaoh's daughter give the child? | -

@ Exod.2.11-15
Whom did Moses see the Egyptian striking? | a Hebrew
Where did Moses hide the dead Egyptian? | in the sand
How many Hebrew men were fighting on the second day? | two
To which land did Moses flee from Pharaoh? | Midian
Where did Moses sit down after fleeing? | by a well

@ Exod.3.1-5
Who was Moses' father-in-law? | Jethro
What is the name of God's mountain in this passage? | Horeb
What was strange about the burning bush? | the bush was not consumed
What did God tell Moses to take off? | your sandals
How many sheep were in the flock Moses was keeping? | -

@ Exod.12.37-41
Where did the children of Israel set out from? | Rameses
How many men traveled on foot? | about six hundred thousand
What did they bake from the dough they brought out of Egypt? | unleavened cakes
How long had the children of Israel lived in Egypt? | four hundred thirty years

@ Exod.16.31-35
What was manna said to look like? | coriander seed
What did manna taste like? | wafers with honey
How much manna was to be kept for future generations? | an omer-full
For how many years did the children of Israel eat manna? | forty years

@ Exod.17.8-13
Where did Amalek fight with Israel? | Rephidim
Whom did Moses ask to choose men for the battle? | Joshua
What happened when Moses let down his hand? | Amalek prevailed
Who held up Moses' hands? | Aaron and Hur
Until when were Moses' hands steady? | sunset

@ Exod.32.1-4
To whom did the people gather when Moses delayed coming down? | Aaron
What did Aaron tell the people to take off and bring to him? | the golden rings
What tool did Aaron use to fashion the gold? | an engraving tool
What did Aaron make from the gold? | a molded calf
How much gold did the people bring? | -

@ Num.13.21-25
Where did the spies come to when they went up by the South? | Hebron
How many years before Zoan was Hebron built? | seven years
What did the spies cut down in the valley of Eshcol? | a branch with one cluster of grapes
After how many days did the spies return? | forty days
How many spies were sent out? | -

@ Num.22.21-25
With whom did Balaam go? | the princes of Moab
How many servants were with Balaam? | two
What did the donkey see standing in the way? | Yahweh's angel #2
What was crushed against the wall? | Balaam's foot

@ Num.17.6-8
How many rods were there in total? | twelve
Where did Moses lay up the rods? | in the Tent of the Testimony
Which house did Aaron's rod stand for? | the house of Levi
What did Aaron's rod bear? | ripe almonds

@ Josh.2.1-6
From where did Joshua send the spies? | Shittim
What was the name of the prostitute whose house the spies entered? | Rahab
How many spies did Joshua send? | two
Where on the roof did Rahab hide the men? | under the stalks of flax
What was the name of the king of Jericho? | -

@ Josh.6.12-16
What were the priests' trumpets made of? | rams' horns
How many times did they march around the city on the second day? | once
How many times did they march around the city on the seventh day? | seven times
What did Joshua tell the people to do at the seventh time? | Shout
How many armed men went in front of the priests? | -

@ Judg.4.17-21
To whose tent did Sisera flee? | Jael
Who was Jael's husband? | Heber the Kenite
Who was the king of Hazor? | Jabin
What did Jael give Sisera to drink? | milk
What did Jael take along with a hammer? | a tent peg

@ Judg.6.36-40
What did Gideon put on the threshing floor? | a fleece of wool
How much water did Gideon wring out of the fleece? | a bowl full of water
On the second night, where was it dry? | on the fleece only #2
How many men were with Gideon at that time? | -

@ Judg.7.16-19
How many men did Gideon divide into three companies? | the three hundred men
What did Gideon put inside the empty pitchers? | torches
What were the men to shout? | For Yahweh and for Gideon!
In which watch did Gideon reach the outermost part of the camp? | the middle watch
Who commanded the camp that Gideon attacked? | -

@ Judg.14.5-9
Where was Samson going with his father and mother? | Timnah
What roared at Samson in the vineyards? | a young lion
What did Samson find in the body of the lion? | a swarm of bees
What was the name of the woman Samson talked with? | -

@ Judg.16.4-9
Where did Delilah live? | the valley of Sorek
How much silver did each lord of the Philistines promise Delilah? | eleven hundred pieces of silver
What did Samson say he could be bound with? | seven green cords
Where was the ambush waiting? | in the inner room

@ Judg.16.27-30
About how many people were on the roof? | about three thousand
For what did Samson want to be avenged on the Philistines? | my two eyes
What did Samson take hold of and lean on? | the two middle pillars
What was the name of the Philistines' god? | -

@ Ruth.1.1-5
Where did the man of Bethlehem Judah go to live? | the country of Moab
What was the name of Elimelech's wife? | Naomi
What were the names of Elimelech's two sons? | Mahlon and Chilion
How long did they live in Moab? | about ten years
Which of the two women did Mahlon marry? | -

@ Ruth.1.15-19
Who refused to leave Naomi? | Ruth
Where did Naomi and Ruth travel to? | Bethlehem
What did the people of the city ask when the two women arrived? | Is this Naomi?
How long did the journey take? | -

@ Ruth.2.1-4
Who was the wealthy relative of Naomi's husband? | Boaz
To which family did Boaz belong? | the family of Elimelech
What did Ruth want to glean in the field? | ears of grain
What did Boaz say to the reapers? | May Yahweh be with you.
How many reapers were working in the field? | -

@ Ruth.4.13-17
What was the name of Ruth's son? | Obed
Who took the child and became his nurse? | Naomi #2
Ruth was said to be better to Naomi than how many sons? | seven sons
Who was Obed the father of? | Jesse

@ 1Sam.1.1-3
What was the name of the man from Ramathaim Zophim? | Elkanah
How many wives did Elkanah have? | two
Where did Elkanah go every year to worship and sacrifice? | Shiloh
Who were the two sons of Eli? | Hophni and Phinehas
How many children did Peninnah have? | -

@ 1Sam.3.2-8
Where was Samuel lying down when Yahweh called him? | in Yahweh's temple
What had begun to happen to Eli's eyes? | begun to grow dim
To whom did Samuel run each time he was called? | Eli #2
What did Samuel say when he heard his name? | Here I am
How old was Samuel at the time? | -

@ 1Sam.9.1-3
Who was Saul's father? | Kish
What had Kish lost? | donkeys
How did Saul compare in height with the people? | taller than any of the people
Where did Saul find the donkeys? | -

@ 1Sam.16.10-13
How many of his sons did Jesse first make pass before Samuel? | seven
What was Jesse's youngest son doing? | keeping the sheep
What did Samuel use to anoint the youngest son? | the horn of oil
Where did Samuel go afterwards? | Ramah

@ 1Sam.17.4-7
Which city was Goliath from? | Gath
How tall was Goliath? | six cubits and a span
How much did Goliath's coat of mail weigh? | five thousand shekels of bronze
What was the staff of Goliath's spear compared to? | a weaver's beam
How long was Goliath's sword? | -

@ 1Sam.17.38-40
Who dressed David in his own clothing? | Saul
Why did David take off the armor? | I have not tested them
How many stones did David choose? | five smooth stones
Where did David get the stones? | the brook

@ 1Sam.17.48-51
Where did David's stone strike the Philistine? | in his forehead
With what did David prevail over the Philistine? | with a sling and with a stone
What did the Philistines do when they saw their champion was dead? | they fled
How far did Israel pursue the fleeing Philistines? | -

@ 1Sam.18.1-4
Whose soul was knit with the soul of David? | Jonathan
Who would not let David go home to his father's house? | Saul #2
What did Jonathan and David make? | a covenant
Besides his robe, what did Jonathan give David? | his sword, his bow, and his sash

@ 1Sam.24.2-4
How many men did Saul take with him to seek David? | three thousand chosen men
What did Saul go into to relieve himself? | a cave
Where were David and his men staying? | the innermost parts of the cave
What did David cut off secretly? | the skirt of Saul's robe
What did Saul say when he found out? | -

@ 2Sam.11.1-4
Whom did David send out with his servants and all Israel? | Joab
Which city did they besiege? | Rabbah
Where was David walking when he saw the woman bathing? | the roof of the king's house
Who was Bathsheba's father? | Eliam
Who was Bathsheba's husband? | Uriah the Hittite

@ 2Sam.18.9-10
What animal was Absalom riding? | his mule
What did the mule go under? | the thick boughs of a great oak
To whom did the man who saw Absalom report it? | Joab
Who killed Absalom? | -

@ 1Kgs.3.16-21
Who came to the king and stood before him? | two women
How many days after the first woman did the second woman give birth? | The third day
Why did the second woman's child die? | because she lay on it
When did the woman take the other's son? | at midnight
What did the king order his servants to bring? | -

@ 1Kgs.10.1-3
Who came to test Solomon with hard questions? | the queen of Sheba
To which city did she come? | Jerusalem
What did her camels carry? | spices, very much gold, and precious stones
What was the name of the queen of Sheba? | -

@ 1Kgs.17.1-6
To whom did Elijah announce the drought? | Ahab
By which brook was Elijah told to hide? | the brook Cherith
What brought Elijah his food? | The ravens
What did Elijah eat morning and evening? | bread and meat
How long did the drought last? | -

@ 1Kgs.18.41-45
Where did Elijah go up to pray? | the top of Carmel
How many times was the servant told to go and look again? | seven times
What did the servant see rising out of the sea? | a small cloud
To which town did Ahab ride? | Jezreel
What was the name of Elijah's servant? | -

@ 2Kgs.2.11-14
What separated Elijah and Elisha? | a chariot of fire and horses of fire
How did Elijah go up into heaven? | by a whirlwind
Into how many pieces did Elisha tear his clothes? | two pieces
What did Elisha take up after Elijah was gone? | Elijah's mantle
Where did Elisha go after crossing the Jordan? | -

@ 2Kgs.5.1-3
Who was the captain of the army of the king of Syria? | Naaman
What illness did Naaman have? | a leper
Who waited on Naaman's wife? | a little girl
In which city was the prophet the girl spoke of? | Samaria
What was the name of the king of Syria? | -

@ 2Kgs.5.9-12
At whose door did Naaman stand? | Elisha
How many times was Naaman told to wash in the Jordan? | seven times
What are the names of the rivers of Damascus? | Abanah and Pharpar
How did Naaman go away? | in a rage
Who persuaded Naaman to change his mind? | -

@ 2Kgs.4.1-5
Whom did the widow cry out to? | Elisha
What had the creditor come to take? | my two children
What did the woman have in her house? | a pot of oil
What did Elisha tell her to borrow from her neighbors? | empty containers
How much did the woman owe the creditor? | -

@ Esth.1.1-3
From where to where did Ahasuerus reign? | from India even to Ethiopia
How many provinces did Ahasuerus rule over? | one hundred twenty-seven
In which year of his reign did Ahasuerus make a feast? | the third year
How many days did the feast last? | -

@ Esth.2.5-7
What was the name of the Jew in the citadel of Susa? | Mordecai
Who had carried Jeconiah king of Judah away? | Nebuchadnezzar
What was Esther's other name? | Hadassah
How was Esther related to Mordecai? | his uncle's daughter

@ Esth.7.8-10
Where had Haman fallen when the king came back? | on the couch where Esther was
Which eunuch told the king about the gallows? | Harbonah
How high were the gallows? | fifty cubits high
For whom had Haman prepared the gallows? | Mordecai
Who was given Haman's house? | -

@ Neh.2.11-15
How many days was the narrator in Jerusalem before he arose at night? | three days
By which gate did he go out by night? | the valley gate
What had happened to the gates of Jerusalem? | consumed with fire
What kind of animal was the narrator riding? | -

@ Job.1.1-3
In which land did Job live? | Uz
How many sons were born to Job? | seven sons
How many camels did Job own? | three thousand camels
How many female donkeys did Job own? | five hundred female donkeys
What was the name of Job's wife? | -

@ Dan.1.3-7
Who was the master of the king's eunuchs? | Ashpenaz
Whose learning and language were the youths to be taught? | the Chaldeans
How long were the youths to be nourished? | three years
What name was given to Daniel? | Belteshazzar
What new name did Azariah receive? | Abednego

@ Dan.1.11-16
For how many days did Daniel ask the steward to test them? | ten days
What did Daniel ask to be given to eat? | vegetables
How did their faces look at the end of the test? | fairer
What was the name of the steward? | -

@ Dan.3.1-3
What did Nebuchadnezzar make? | an image of gold
How tall was the image? | sixty cubits
Where did Nebuchadnezzar set up the image? | the plain of Dura
How many people came to the dedication? | -

@ Dan.3.19-23
How much hotter was the furnace to be heated? | seven times more than it was usually heated
Who was ordered to bind Shadrach, Meshach, and Abednego? | certain mighty men who were in his army
What killed the men who took up the three prisoners? | the flame of the fire
Who was seen walking with them in the fire? | -

@ Dan.5.1-5
How many lords did Belshazzar invite to his feast? | a thousand
Who had taken the vessels out of the temple? | Nebuchadnezzar
What came out and wrote on the plaster of the wall? | the fingers of a man's hand
Near what did the hand write? | the lamp stand
What words did the hand write? | -

@ Dan.6.10-12
In which direction were Daniel's windows open? | toward Jerusalem
How often did Daniel kneel and pray? | three times a day
For how many days did the decree forbid petitions to anyone but the king? | thirty days
Into what was a man who broke the decree to be cast? | the den of lions

@ Dan.6.16-20
What was laid on the mouth of the den? | A stone
With what did the king seal the stone? | his own signet
How did the king pass the night? | fasting
When did the king go to the den? | very early in the morning
How many lions were in the den? | -

@ Jonah.1.1-5
Whose son was Jonah? | Amittai
To which city was Jonah told to go? | Nineveh
Where did Jonah try to flee to? | Tarshish
Where did Jonah find a ship? | Joppa
What did the mariners throw into the sea? | the cargo

@ Jonah.3.1-5
How large was Nineveh? | three days' journey across
In how many days was Nineveh to be overthrown? | forty days
What did the people of Nineveh put on? | sackcloth
What did the king of Nineveh sit in? | -

@ Jonah.4.5-8
Where did Jonah sit outside the city? | the east side of the city
What did Yahweh God prepare to shade Jonah? | a vine
What chewed on the vine? | a worm
What kind of wind did God send when the sun arose? | a sultry east wind
How many people lived in Nineveh? | -

@ Luke.1.5-9
Who was king of Judea at that time? | Herod
What was the name of the priest? | Zacharias
What was the name of the priest's wife? | Elizabeth
What was the priest chosen by lot to do in the temple? | burn incense
How old was Zacharias? | -

@ Luke.1.57-63
On which day did they come to circumcise the child? | the eighth day
What name would the relatives have given the child? | Zacharias
What did the father ask for to write the name? | a writing tablet
Why was the child's father unable to speak? | -

@ Luke.2.1-7
Who issued the decree that all the world should be enrolled? | Caesar Augustus
Who was governor of Syria during the first enrollment? | Quirinius
From which city did Joseph go up? | Nazareth
Where did Mary lay her newborn son? | a feeding trough
Why was the baby laid there? | there was no room for them in the inn

@ Luke.2.41-46
For which feast did his parents go to Jerusalem every year? | the Passover
How old was Jesus when he stayed behind in Jerusalem? | twelve years old
How far did his parents travel before they looked for him? | a day's journey
After how many days did they find him? | three days
Where did they find him? | in the temple

@ Luke.5.4-7
To whom did Jesus say to put out into the deep? | Simon
How long had Simon worked without catching anything? | all night
How many boats were filled with fish? | both boats
How many fish were caught? | -

@ Luke.10.30-35
Where was the man going when he fell among robbers? | Jericho
Who was the first to pass by on the other side? | a certain priest
What did the Samaritan pour on the man's wounds? | oil and wine
How much money did the Samaritan give the host? | two denarii
What was the name of the man who was robbed? | -

@ Luke.15.11-16
Which son asked for his share of the property? | The younger
How did the younger son waste his property? | with riotous living
What work was he sent into the fields to do? | to feed pigs
What did he long to fill his belly with? | the pods that the pigs ate
What was the name of the far country? | -

@ Luke.19.1-6
Through which city was Jesus passing? | Jericho
What was Zacchaeus's job? | a chief tax collector
Why couldn't Zacchaeus see Jesus over the crowd? | he was short
What did Zacchaeus climb? | a sycamore tree
How much did Zacchaeus give to the poor? | -

@ Matt.2.9-11
What went before them and stood over where the child was? | the star
Whom did they see with the young child? | Mary
What gifts did they offer the child? | gold, frankincense, and myrrh
How many wise men were there? | -

@ Mark.6.38-44
How many loaves did the disciples have? | Five
Where were the people told to sit? | on the green grass
How many baskets of broken pieces were taken up? | twelve baskets
How many men ate the loaves? | five thousand men
How many women and children were fed? | -

@ John.2.1-8
Where was the wedding held? | Cana of Galilee
How many water pots were set there? | six
What were the water pots made of? | stone
To whom were the servants to take what they drew out? | the ruler of the feast
Who was the bridegroom? | -

@ John.11.38-44
What lay against the tomb? | a stone
Who was the sister of the dead man? | Martha
How long had the man been dead? | four days
What was the dead man's face wrapped with? | a cloth

@ John.21.9-11
What did they see when they got out on the land? | a fire of coals
Who drew the net to land? | Simon Peter
How many fish were in the net? | one hundred fifty-three
How far from the land had the boat been? | -

@ Acts.1.9-12
What received him out of their sight? | a cloud
How were the two men who stood by them dressed? | in white clothing
From which mountain did they return to Jerusalem? | Olivet
How far is the mountain from Jerusalem? | a Sabbath day's journey
What were the names of the two men? | -

@ Acts.3.1-7
At what hour did Peter and John go up to the temple? | the ninth hour
What was the temple door called where the lame man was laid? | Beautiful
What did Peter say he did not have? | silver or gold
By which hand did Peter raise the man up? | the right hand
How old was the lame man? | -

@ Acts.8.26-30
Philip was sent to the road from Jerusalem to which town? | Gaza
Who was the queen of the Ethiopians? | Candace
Which prophet was the eunuch reading? | Isaiah
What was the eunuch's name? | -

@ Acts.9.3-9
Which city was Saul approaching? | Damascus
What shone around Saul? | a light from the sky
How long was Saul without sight? | three days
What were the names of the men traveling with Saul? | -

@ Acts.9.36-40
In which city did Tabitha live? | Joppa
What does the name Tabitha mean when translated? | Dorcas
Where was Tabitha laid after she was washed? | an upper room
Where was Peter when the disciples sent for him? | Lydda
Of what illness did Tabitha die? | -

@ Acts.10.1-6
In which city did Cornelius live? | Caesarea
Which regiment did Cornelius serve in? | the Italian Regiment
At what time of day did Cornelius see the vision? | about the ninth hour
What was the trade of the Simon with whom Peter was staying? | a tanner
Where was the tanner's house? | by the seaside

@ Acts.12.6-10
Between whom was Peter sleeping? | two soldiers
How many chains was Peter bound with? | two chains
What gate opened to them by itself? | the iron gate
Where did Peter go after the angel left him? | -

@ Acts.16.11-15
From where did they set sail? | Troas
Philippi is a city of which region? | Macedonia
What did Lydia sell? | purple
What city was Lydia from? | Thyatira
How many people were in Lydia's household? | -

@ Acts.16.25-30
What were Paul and Silas doing about midnight? | praying and singing hymns to God
What shook the foundations of the prison? | a great earthquake
What did the jailer draw? | his sword
Why was the jailer about to kill himself? | supposing that the prisoners had escaped
What was the jailer's name? | -

@ Acts.18.1-4
Where did Paul go after leaving Athens? | Corinth
What was the name of Aquila's wife? | Priscilla
Who had commanded all the Jews to depart from Rome? | Claudius
What was their trade? | tent makers
How long did Paul stay in Corinth? | -

@ Acts.20.7-12
On which day were the disciples gathered to break bread? | the first day of the week
Until when did Paul continue his speech? | midnight
What was the name of the young man who sat in the window? | Eutychus
From which floor did he fall? | the third floor
How old was the young man? | -

@ Acts.27.37-41
How many souls were on the ship? | two hundred seventy-six
What did they throw into the sea to lighten the ship? | the wheat
What did they hoist to the wind? | the foresail
Which part of the ship struck and remained immovable? | The bow
What was the name of the island they had reached? | -

@ Acts.28.1-6
What was the island called? | Malta
What fastened on Paul's hand? | a viper
What did the natives first think Paul was? | a murderer
What did they say about Paul in the end? | he was a god
Who was the chief man of the island? | -

@ shakespeare 13485-13503 | As You Like It
Who says that all the world's a stage? | JAQUES
How many ages are a man's acts said to be? | seven ages
What does the whining school-boy carry? | his satchel
To what is the lover's woeful ballad made? | his mistress' eyebrow
Where does the soldier seek the bubble reputation? | the cannon's mouth

@ shakespeare 35421-35442 | Hamlet
How long had the skull lain in the earth? | three-and-twenty years
Whose skull was it? | Yorick's
What had Yorick been? | the king's jester
What had Yorick poured on the clown's head? | a flagon of Rhenish
How did Yorick die? | -

@ shakespeare 35070-35092 | Hamlet
What grows aslant the brook? | a willow
What do cold maids call long purples? | dead men's fingers
What broke while she climbed to hang her garlands? | an envious sliver
What bore her up awhile in the water? | Her clothes
Who first found her body? | -

@ shakespeare 141897-141912 | Romeo and Juliet
In which city is the scene laid? | Verona
How are the two households described? | both alike in dignity
What kind of lovers take their life from the two foes? | star-cross'd lovers
How long is the traffic of the stage? | the two hours
What are the names of the two households? | -

@ shakespeare 142386-142400 | Romeo and Juliet
Who asks Capulet about his suit? | Paris
What age has Capulet's child not yet reached? | fourteen years
How many more summers does Capulet want to wait before she marries? | two more summers
What is the name of Capulet's child? | -

@ shakespeare 154872-154895 | The Tempest
Of which city was Miranda's father the Duke? | Milan
How long ago was he the Duke? | Twelve year since
How did Prospero say they were heaved from their home? | By foul play
Who took the dukedom from Prospero? | -

@ shakespeare 101524-101552 | The Merchant of Venice
In which city does the scene take place? | Venice
How many ducats does Bassanio want? | Three thousand ducats
For how long does Bassanio want the money? | three months
Who shall be bound for the loan? | Antonio
What interest does Shylock ask for? | -

@ shakespeare 101690-101706 | The Merchant of Venice
Where has Antonio rated Shylock about his moneys? | In the Rialto
What does Shylock call the badge of all his tribe? | suff'rance
What did Antonio spit upon? | my Jewish gaberdine
What names does Antonio call Shylock? | misbeliever, cut-throat dog

@ shakespeare 78390-78410 | Julius Caesar
Who speaks to the friends, Romans, and countrymen? | ANTONY
Whom has he come to bury? | Caesar
What did Brutus say Caesar was? | ambitious
What did the ransoms of Caesar's captives fill? | the general coffers
On what date was Caesar killed? | -

@ shakespeare 92271-92299 | Macbeth
What does the first witch hail Macbeth as? | Thane of Glamis
What does the second witch hail Macbeth as? | Thane of Cawdor
What does the third witch say Macbeth shall be? | king hereafter
Who asks the witches to speak to him too? | BANQUO
Where does this meeting take place? | -

@ shakespeare 92575-92595 | Macbeth
Where is Macbeth's castle? | Inverness
Who reads the letter? | LADY MACBETH
What did the witches do when he wanted to question them further? | made themselves air
How does the letter address Lady Macbeth? | my dearest partner of greatness
Who carried the letter to the castle? | -

@ shakespeare 49966-49984 | Henry V
What will the good man teach his son? | This story
What does the speaker call those who fight with him? | band of brothers
Upon which day did they fight? | Saint Crispin's day
Where are the gentlemen now a-bed? | England
How many men does the king have with him? | -
"""

_HEADER = re.compile(
    r"^@\s+(?:(?P<book>[1-3]?[A-Za-z]+)\.(?P<ch>\d+)\.(?P<v1>\d+)-(?P<v2>\d+)"
    r"|shakespeare\s+(?P<l1>\d+)-(?P<l2>\d+)\s*\|\s*(?P<title>.+))\s*$"
)
_ANSWER = re.compile(r"^(?P<text>.*?)(?:\s+#(?P<occ>\d+))?$")


class AnnotationError(ValueError):
    pass


def load_bible() -> dict[str, str]:
    verses: dict[str, str] = {}
    for split in ("train", "validation", "test"):  # the verse-level splits of bible_en_es
        with gzip.open(BUILTIN / "bible_en_es" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                verses[row["id"]] = row["en"]
    return verses


def load_shakespeare() -> list[str]:
    with gzip.open(BUILTIN / "shakespeare" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        return f.read().split("\n")


def parse_annotations(text: str) -> list[dict]:
    passages: list[dict] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("@"):
            m = _HEADER.match(line)
            if not m:
                raise AnnotationError(f"annotation line {n}: bad passage header {line!r}")
            passages.append({"header": m.groupdict(), "qas": [], "line": n})
            continue
        if not passages or "|" not in line:
            raise AnnotationError(f"annotation line {n}: expected 'question | answer', got {line!r}")
        question, answer = (s.strip() for s in line.rsplit("|", 1))
        if not question.endswith("?") or not answer:
            raise AnnotationError(f"annotation line {n}: malformed {line!r}")
        passages[-1]["qas"].append((question, answer, n))
    return passages


def build_context(header: dict, verses: dict[str, str], lines: list[str]) -> tuple[str, str, str]:
    """Return (passage id, title, context) for a parsed header."""
    if header["book"]:
        book, ch = header["book"], int(header["ch"])
        v1, v2 = int(header["v1"]), int(header["v2"])
        if book not in BOOKS or v2 < v1:
            raise AnnotationError(f"bad Bible range {book}.{ch}.{v1}-{v2}")
        parts = []
        for v in range(v1, v2 + 1):
            key = f"{book}.{ch}.{v}"
            if key not in verses:
                raise AnnotationError(f"verse {key} not found in bible_en_es")
            parts.append(" ".join(verses[key].split()))
        return f"{book}.{ch}.{v1}-{v2}", f"{BOOKS[book]} {ch}", " ".join(parts)
    l1, l2 = int(header["l1"]), int(header["l2"])
    if not 1 <= l1 <= l2 <= len(lines):
        raise AnnotationError(f"bad Shakespeare line range {l1}-{l2}")
    context = " ".join(" ".join(x.split()) for x in lines[l1 - 1:l2] if x.strip())
    return f"shakespeare.{l1}-{l2}", header["title"].strip(), context


def locate(context: str, answer: str, occurrence: int) -> tuple[str, int]:
    """Find the occurrence-th match of answer in context; straight apostrophes may match ’."""
    candidates = [answer]
    if "'" in answer:
        candidates.append(answer.replace("'", "\u2019"))
    for cand in candidates:
        starts = [m.start() for m in re.finditer(re.escape(cand), context)]
        if len(starts) >= occurrence:
            return cand, starts[occurrence - 1]
    raise AnnotationError(f"answer {answer!r} (occurrence {occurrence}) not found")


def build_examples() -> list[dict]:
    verses, lines = load_bible(), load_shakespeare()
    passages = []
    seen_ids = set()
    errors = []
    for p in parse_annotations(ANNOTATIONS):
        try:
            pid, title, context = build_context(p["header"], verses, lines)
        except AnnotationError as e:
            errors.append(f"annotation line {p['line']}: {e}")
            continue
        if pid in seen_ids:
            errors.append(f"annotation line {p['line']}: duplicate passage {pid}")
        seen_ids.add(pid)
        if not MIN_CONTEXT <= len(context) <= MAX_CONTEXT:
            errors.append(f"{pid}: context length {len(context)} outside [{MIN_CONTEXT}, {MAX_CONTEXT}]")
        if not 2 <= len(p["qas"]) <= 6:
            errors.append(f"{pid}: {len(p['qas'])} questions (expected 2-6)")
        examples = []
        questions = set()
        for i, (question, answer, n) in enumerate(p["qas"], 1):
            if question in questions:
                errors.append(f"annotation line {n}: duplicate question in {pid}")
            questions.add(question)
            if answer == "-":
                answers = {"text": [], "answer_start": []}
            else:
                m = _ANSWER.match(answer)
                occ = int(m["occ"] or 1)
                try:
                    text, start = locate(context, m["text"], occ)
                except AnnotationError as e:
                    errors.append(f"annotation line {n} ({pid}): {e}")
                    continue
                answers = {"text": [text], "answer_start": [start]}
            examples.append({
                "id": f"{pid}.q{i}", "title": title, "context": context,
                "question": question, "answers": answers,
            })
        passages.append({"id": pid, "examples": examples})
    if errors:
        raise AnnotationError("invalid annotations:\n  " + "\n  ".join(errors))
    return passages


def validate(example: dict) -> None:
    ctx, ans = example["context"], example["answers"]
    if len(ans["text"]) != len(ans["answer_start"]):
        raise AnnotationError(f"{example['id']}: text/answer_start length mismatch")
    for text, start in zip(ans["text"], ans["answer_start"]):
        if not text or ctx[start:start + len(text)] != text:
            raise AnnotationError(f"{example['id']}: answer {text!r} is not context[{start}:...]")


def split_passages(passages: list[dict]) -> dict[str, list[dict]]:
    order = list(range(len(passages)))
    random.Random(SEED).shuffle(order)
    n = len(order)
    n_val = round(n * SPLITS[1][1])
    n_test = round(n * SPLITS[2][1])
    n_train = n - n_val - n_test
    chosen = {
        "train": order[:n_train],
        "validation": order[n_train:n_train + n_val],
        "test": order[n_train + n_val:],
    }
    # Keep annotation order inside each split: it is readable and deterministic.
    return {name: [passages[i] for i in sorted(idx)] for name, idx in chosen.items()}


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="build and validate, write nothing")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: the builtin one)")
    args = ap.parse_args(argv)

    passages = build_examples()
    for p in passages:
        for ex in p["examples"]:
            validate(ex)
    splits = split_passages(passages)
    total_q = total_u = 0
    for name, ps in splits.items():
        rows = [ex for p in ps for ex in p["examples"]]
        unans = sum(not ex["answers"]["text"] for ex in rows)
        total_q += len(rows)
        total_u += unans
        print(f"{name:10s} passages={len(ps):4d} questions={len(rows):4d} unanswerable={unans:3d}")
        if not args.check:
            args.out.mkdir(parents=True, exist_ok=True)
            write_jsonl_gz(args.out / f"{name}.jsonl.gz", rows)
    print(f"{'total':10s} passages={len(passages):4d} questions={total_q:4d} "
          f"unanswerable={total_u:3d} ({100 * total_u / total_q:.1f}%)")
    if not args.check:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AnnotationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
